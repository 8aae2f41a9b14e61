-- A batch holding an object older than what is already loaded (a late
-- arrival) cannot be applied on its own: the whole history of its keys
-- decides their current state. This selects that history; each key's latest
-- change is then picked from it (src/merge/latest.rs).
SELECT h.* FROM {history} h
LEFT SEMI JOIN (SELECT DISTINCT {key} FROM {batch}) b ON {key_equal}
