-- A batch holding an object older than what is already loaded (a late
-- arrival) cannot be applied on its own: the whole history of its keys
-- decides their current state. This selects that history; latest_change.sql
-- then picks each key's latest change from it.
SELECT h.* FROM {history} h
LEFT SEMI JOIN (SELECT DISTINCT {key} FROM {batch}) b ON {key_equal}
