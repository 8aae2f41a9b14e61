-- The latest change of each primary key among {changes}, by change order.
-- Used for the current-state MERGE of a batch, and to rebuild current state.
-- A hash aggregation: per key it keeps the values of the row with the
-- largest change_seq ({latest_values} is `last_value(c ORDER BY change_seq)`
-- for each other column). Nothing is sorted, so memory grows with the number
-- of distinct keys, not with the number of changes.
SELECT {key}, {latest_values}, max({change_seq}) AS {change_seq}
FROM {changes}
GROUP BY {key}
