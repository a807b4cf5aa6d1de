"""pg_apikeys from Python with psycopg 3: create a key, verify it, mint a token, verify it, and
read rows through a row-level-security policy as a role that cannot bypass it.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python quickstart.py

The connecting role must be allowed to manage keys (a superuser here, for the set-up).
"""
import os

import psycopg
from psycopg.types.json import Jsonb

SETUP = """
CREATE EXTENSION IF NOT EXISTS pg_apikeys;
DROP SCHEMA IF EXISTS example_py CASCADE;
CREATE SCHEMA example_py;
CREATE TABLE example_py.orders (id serial PRIMARY KEY, tenant text NOT NULL, item text NOT NULL);
INSERT INTO example_py.orders (tenant, item)
    VALUES ('acme', 'anvil'), ('acme', 'rocket'), ('globex', 'laser');
ALTER TABLE example_py.orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_reads ON example_py.orders FOR SELECT
    USING (tenant = (SELECT apikeys.current_owner())
           AND (SELECT apikeys.has_permission('orders', 'read')));
DO $$ BEGIN CREATE ROLE example_app; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT USAGE ON SCHEMA example_py TO example_app;
GRANT SELECT ON example_py.orders TO example_app;
"""


def main() -> None:
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(SETUP)

        # Create a key: the key string comes back once; the database keeps only its hash.
        key_id, key = conn.execute(
            "SELECT id, key FROM apikeys.create_api_key(owner => %s, permissions => %s)",
            ("acme", Jsonb({"orders": ["read"]})),
        ).fetchone()
        print(f"created {key_id}: {key[:10]}…")

        # Verify it, requiring a permission. Bad keys never raise: valid is false, code says why.
        valid, code, owner = conn.execute(
            "SELECT valid, code, owner FROM apikeys.verify_key(%s, required => %s)",
            (key, Jsonb({"orders": ["read"]})),
        ).fetchone()
        print(f"verify_key: {code} (owner {owner})")
        assert (valid, code, owner) == (True, "VALID", "acme")
        (code,) = conn.execute("SELECT code FROM apikeys.verify_key('sk_not_a_key')").fetchone()
        assert code == "NOT_FOUND", code

        # Mint a token carrying the key's access for one minute, and verify it.
        (token,) = conn.execute("SELECT apikeys.mint_token(%s, 60000)", (key,)).fetchone()
        code, claims = conn.execute(
            "SELECT code, claims FROM apikeys.verify_token(%s)", (token,)
        ).fetchone()
        print(f"verify_token: {code} (expires at {claims['exp_ms']} ms)")
        assert code == "VALID" and claims["sub"] == "acme"

        # Row-level security: the transaction authenticates with the token; the policy sees it.
        with conn.transaction():
            conn.execute("SET LOCAL ROLE example_app")
            conn.execute("SELECT apikeys.authenticate(%s)", (token,))
            items = [r[0] for r in conn.execute("SELECT item FROM example_py.orders ORDER BY item")]
        print(f"acme sees: {items}")
        assert items == ["anvil", "rocket"], items

        # The identity ended with the transaction.
        with conn.transaction():
            conn.execute("SET LOCAL ROLE example_app")
            rows = conn.execute("SELECT count(*) FROM example_py.orders").fetchone()[0]
        assert rows == 0, rows

        # A wrong credential is SQLSTATE 28000 and sets nothing.
        try:
            with conn.transaction():
                conn.execute("SELECT apikeys.authenticate('sk_not_a_key')")
            raise AssertionError("authenticate accepted a bad key")
        except psycopg.errors.InvalidAuthorizationSpecification as e:
            print(f"bad key: {e.sqlstate} {e.diag.message_primary}")
    print("python example: ok")


if __name__ == "__main__":
    main()
