-- (Run locally by DataFusion over the staged Parquet file.) The first and
-- last commit day of a batch: the history partitions its MERGE touches.
SELECT CAST(CAST(min({commit_ts}) AS DATE) AS VARCHAR) AS first_day,
       CAST(CAST(max({commit_ts}) AS DATE) AS VARCHAR) AS last_day
FROM {rows}
