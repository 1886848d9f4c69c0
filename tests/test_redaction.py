"""Row data and credentials never leave a run in an error message; output is capped."""

from runbook.redaction import REDACTED, redact_output, redact_row_data, tail


def test_failing_row_and_duplicate_key_values_are_redacted() -> None:
    text = (
        'ERROR:  new row for relation "users" violates check constraint "users_age"\n'
        "DETAIL:  Failing row contains (7, alice@example.com, -3).\n"
        'ERROR:  duplicate key value violates unique constraint "users_email_key"\n'
        "DETAIL:  Key (email)=(bob@example.com) already exists.\n"
    )
    out = redact_row_data(text)
    assert "alice@example.com" not in out and "bob@example.com" not in out
    assert f"Failing row contains ({REDACTED})" in out
    assert f"Key (email)=({REDACTED}) already exists." in out
    assert 'violates check constraint "users_age"' in out  # the cause stays readable


def test_keys_quoted_by_index_builds_and_foreign_keys_are_redacted() -> None:
    text = (
        'ERROR:  could not create unique index "uq_users_email"\n'
        "DETAIL:  Key (email)=(ada.lovelace@example.com) is duplicated.\n"
        'ERROR:  update or delete on table "users" violates foreign key constraint "fk"\n'
        'DETAIL:  Key (id)=(42) is still referenced from table "orders".\n'
    )
    out = redact_row_data(text)
    assert "lovelace" not in out and "(42)" not in out
    assert f"Key (email)=({REDACTED}) is duplicated." in out
    assert f"Key (id)=({REDACTED}) is still referenced from table" in out
    assert 'could not create unique index "uq_users_email"' in out


def test_copy_context_lines_lose_the_row() -> None:
    text = (
        'pg_restore: error: COPY failed for table "users": ERROR:  invalid input syntax '
        'for type integer: "carol"\n'
        'CONTEXT:  COPY users, line 2, column age: "carol"\n'
        'CONTEXT:  COPY orders, line 9: "9\tcarol@example.com\t12.50"\n'
    )
    out = redact_row_data(text)
    assert "carol" not in out
    assert f"COPY users, line 2, column age: {REDACTED}" in out
    assert f"COPY orders, line 9: {REDACTED}" in out


def test_credentials_in_urls_and_key_value_pairs_are_masked() -> None:
    out = redact_row_data("connect postgresql://app:s3cr%zzet@db:5432/x failed; password=hunter2 x")
    assert "s3cr%zzet" not in out and "hunter2" not in out
    assert "postgresql://app:" in out


def test_tail_keeps_the_last_lines_and_says_what_was_cut() -> None:
    text = "\n".join(f"line {i}" for i in range(100))
    out = tail(text, max_lines=3)
    assert out.splitlines() == ["[… 97 earlier lines cut]", "line 97", "line 98", "line 99"]
    assert tail("short\n") == "short"


def test_redact_output_caps_characters() -> None:
    out = redact_output("x" * 10_000, max_chars=100)
    assert len(out) < 140 and out.endswith("x" * 100)
