"""Routing decisions (L0: no I/O).

custom      PgCat's custom SQL commands (SET/SHOW SERVER ROLE, PRIMARY READS)
sql         PREPARE / EXECUTE / DEALLOCATE seen in transaction mode
pgquery     libpg_query (PostgreSQL's parser) through cffi: text -> parse tree
infer       parse tree -> Inference (role, transaction flags, tables, keys)
classify    Classifier: a pool's entry point, with the cache by query text
shardkey    automatic sharding key values, Bind parameters, shard_for
hints       shard_id_regex / sharding_key_regex comment hints
functions   the functions a replica-bound query may call
"""
