"""Functions a query may call and still go to a replica (L0, data).

``BUILTIN_READ_ONLY``: PostgreSQL catalog (``pg_catalog``) functions that
cannot write and that a hot standby runs in a read-only transaction: no
sequence (nextval, setval, currval and lastval, which reads a value only
the session that called nextval has), no lock (advisory locks are session
state of one server), no transaction id assignment (txid_current), no
NOTIFY, no configuration change (set_config), no large objects, no
administration (pg_terminate_backend, pg_reload_conf...), no function that
runs SQL text given as an argument (query_to_xml, ts_rewrite with a query)
and none that a standby refuses (pg_current_wal_lsn). Anything not listed
here nor in the pool's ``query_parser_read_only_functions`` is taken as a
write, so a user-defined function goes to the primary unless listed.

``tests/test_router.py`` checks against the real server that every name
here is a function in ``pg_catalog``.

Names are as the parser gives them: lower case, without schema. SQL's
special forms that are not function calls in the parse tree (COALESCE,
NULLIF, GREATEST, LEAST, CURRENT_TIMESTAMP, CURRENT_USER, ...) need no entry;
forms that become calls (EXTRACT -> extract, SUBSTRING -> substring, TRIM ->
btrim, x AT TIME ZONE -> timezone, OVERLAPS -> overlaps, POSITION ->
position, COLLATION FOR -> pg_collation_for, ...) are listed.
"""

_AGGREGATES_AND_WINDOWS = """
count sum avg min max array_agg string_agg json_agg jsonb_agg json_object_agg
jsonb_object_agg bool_and bool_or every bit_and bit_or bit_xor stddev stddev_pop
stddev_samp variance var_pop var_samp corr covar_pop covar_samp regr_avgx regr_avgy
regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy
percentile_cont percentile_disc mode rank dense_rank percent_rank cume_dist
row_number ntile lag lead first_value last_value nth_value range_agg
range_intersect_agg xmlagg
"""

_MATH = """
abs cbrt ceil ceiling degrees div exp factorial floor gcd lcm ln log log10 min_scale
mod pi power radians round scale sign sqrt trim_scale trunc width_bucket random
acos acosd asin asind atan atand atan2 atan2d cos cosd cot cotd sin sind tan tand
sinh cosh tanh asinh acosh atanh int2 int4 int8 float4 float8 numeric
"""

_STRINGS = """
ascii bit_length btrim char_length character_length chr concat concat_ws convert
convert_from convert_to decode encode format initcap left length lower lpad ltrim
md5 normalize octet_length overlay position quote_ident quote_literal quote_nullable
regexp_count regexp_instr regexp_like regexp_match regexp_matches regexp_replace
regexp_split_to_array regexp_split_to_table regexp_substr repeat replace reverse
right rpad rtrim sha224 sha256 sha384 sha512 split_part starts_with strpos substr
substring to_ascii to_hex translate unistr upper string_to_array string_to_table
array_to_string text varchar bpchar get_bit get_byte set_bit set_byte bit_count

"""

_FORMATTING_AND_TIME = """
to_char to_date to_number to_timestamp age clock_timestamp date_bin date_part
date_trunc extract isfinite justify_days justify_hours justify_interval make_date
make_interval make_time make_timestamp make_timestamptz now statement_timestamp
timeofday transaction_timestamp timezone overlaps date time timestamp timestamptz
interval pg_sleep pg_sleep_for pg_sleep_until
"""

_ARRAYS_AND_RANGES = """
array_append array_cat array_dims array_fill array_length array_lower array_ndims
array_position array_positions array_prepend array_remove array_replace array_upper
cardinality trim_array unnest generate_series generate_subscripts isempty lower_inc
lower_inf upper_inc upper_inf range_merge multirange int4range int8range numrange
tsrange tstzrange daterange int4multirange int8multirange nummultirange
tsmultirange tstzmultirange datemultirange
"""

_JSON = """
to_json to_jsonb array_to_json row_to_json json_build_array jsonb_build_array
json_build_object jsonb_build_object json_object jsonb_object json_array_length
jsonb_array_length json_each jsonb_each json_each_text jsonb_each_text
json_extract_path jsonb_extract_path json_extract_path_text jsonb_extract_path_text
json_object_keys jsonb_object_keys json_populate_record jsonb_populate_record
json_populate_recordset jsonb_populate_recordset json_to_record jsonb_to_record
json_to_recordset jsonb_to_recordset json_array_elements jsonb_array_elements
json_array_elements_text jsonb_array_elements_text json_typeof jsonb_typeof
json_strip_nulls jsonb_strip_nulls jsonb_set jsonb_set_lax jsonb_insert jsonb_pretty
jsonb_path_exists jsonb_path_match jsonb_path_query jsonb_path_query_array
jsonb_path_query_first jsonb_path_exists_tz jsonb_path_match_tz jsonb_path_query_tz
jsonb_path_query_array_tz jsonb_path_query_first_tz
"""

_TEXT_SEARCH_AND_NETWORK = """
to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery
ts_rank ts_rank_cd ts_headline setweight strip numnode querytree tsvector_to_array
array_to_tsvector ts_delete ts_filter get_current_ts_config
abbrev broadcast family host hostmask inet_merge inet_same_family masklen netmask
network set_masklen
"""

_SESSION_AND_CATALOG = """
current_database current_schema current_schemas current_setting current_query
version pg_backend_pid pg_postmaster_start_time pg_conf_load_time
inet_client_addr inet_client_port inet_server_addr inet_server_port
pg_is_in_recovery pg_last_wal_receive_lsn pg_last_wal_replay_lsn
pg_last_xact_replay_timestamp pg_current_snapshot pg_snapshot_xmin
pg_snapshot_xmax pg_snapshot_xip pg_visible_in_snapshot txid_current_snapshot
txid_snapshot_xmin txid_snapshot_xmax txid_visible_in_snapshot pg_typeof
format_type pg_get_userbyid pg_get_indexdef pg_get_viewdef pg_get_constraintdef
pg_get_expr pg_get_functiondef pg_get_function_arguments
pg_get_function_identity_arguments pg_get_function_result pg_get_triggerdef
pg_get_ruledef pg_get_serial_sequence pg_get_keywords obj_description
col_description shobj_description pg_table_is_visible pg_type_is_visible
pg_function_is_visible to_regclass to_regtype to_regproc to_regprocedure
to_regnamespace to_regrole to_regoper to_regoperator has_table_privilege
has_column_privilege has_any_column_privilege has_schema_privilege
has_database_privilege has_function_privilege has_sequence_privilege
has_type_privilege has_tablespace_privilege has_language_privilege
pg_has_role row_security_active pg_collation_for pg_column_size pg_relation_size
pg_table_size pg_indexes_size pg_total_relation_size pg_database_size
pg_tablespace_size pg_size_pretty pg_size_bytes pg_relation_filenode
pg_encoding_to_char pg_char_to_encoding pg_client_encoding
pg_jit_available pg_trigger_depth pg_my_temp_schema pg_is_other_temp_schema
num_nulls num_nonnulls gen_random_uuid
"""

BUILTIN_READ_ONLY = frozenset(" ".join((
    _AGGREGATES_AND_WINDOWS, _MATH, _STRINGS, _FORMATTING_AND_TIME,
    _ARRAYS_AND_RANGES, _JSON, _TEXT_SEARCH_AND_NETWORK, _SESSION_AND_CATALOG,
)).split())


def user_list(names):
    """A pool's ``query_parser_read_only_functions`` as a frozenset of
    lower-case names: ``"f"`` allows an unqualified call ``f(...)``,
    ``"s.f"`` allows ``s.f(...)``."""
    out = set()
    for name in names:
        name = name.strip().lower().replace('"', "")
        if not name or name.count(".") > 1:
            raise ValueError(f"not a function name: {name!r}")
        out.add(name)
    return frozenset(out)


def read_only(names, allowed):
    """``names``: a call's name parts as parsed (``["lower"]``,
    ``["pg_catalog", "now"]``, ``["s", "f"]``); ``allowed``: a user list."""
    if len(names) == 1:
        name = names[0]
        return name in BUILTIN_READ_ONLY or name in allowed
    if len(names) == 2:
        if names[0] == "pg_catalog" and names[1] in BUILTIN_READ_ONLY:
            return True
        return f"{names[0]}.{names[1]}" in allowed
    return False  # db.schema.f: not something to guess about
