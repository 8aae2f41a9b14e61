-- The whole life of one row: every change of one key, in change order.
SELECT * FROM {versions} WHERE {key_match} ORDER BY {change_seq}
