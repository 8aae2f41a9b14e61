-- The history rows of one change_seq range: what a batch's rows at or below
-- the loaded maximum may repeat (a change delivered again in another
-- object). {history}, {columns} and {change_seq} are quoted identifiers,
-- {lo} and {hi} literals.
SELECT {columns}
FROM {history}
WHERE {change_seq} BETWEEN {lo} AND {hi}
