-- The latest change of each primary key among {changes}, by change order.
-- Used for the current-state MERGE of a batch.
SELECT * EXCLUDE (__rank) FROM (
    SELECT *,
           row_number() OVER (PARTITION BY {key} ORDER BY {change_seq} DESC) AS __rank
    FROM {changes}
) WHERE __rank = 1
