-- BigQuery: new columns of {current} that come with the value the rows stored
-- before them hold (a column added with a default), added and filled by one
-- job: every row of {rows} predates them, since the batch starts at their
-- first object. {add}: `ADD COLUMN IF NOT EXISTS c TYPE, …`; {set}:
-- `c = CAST('value' AS TYPE), …` (literals, quoted the GoogleSQL way: a
-- script takes no query parameters on bqemulator).
ALTER TABLE {current} {add};
UPDATE {current} SET {set} WHERE {rows}
