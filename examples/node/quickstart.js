// pg_apikeys from Node.js with node-postgres: create a key, verify it, mint a token, verify it,
// and read rows through a row-level-security policy as a role that cannot bypass it.
//
//   DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres node quickstart.js
//
// The connecting role must be allowed to manage keys (a superuser here, for the set-up).
'use strict';
const assert = require('node:assert/strict');
const { Client } = require('pg');

const SETUP = `
CREATE EXTENSION IF NOT EXISTS pg_apikeys;
DROP SCHEMA IF EXISTS example_js CASCADE;
CREATE SCHEMA example_js;
CREATE TABLE example_js.orders (id serial PRIMARY KEY, tenant text NOT NULL, item text NOT NULL);
INSERT INTO example_js.orders (tenant, item)
    VALUES ('acme', 'anvil'), ('acme', 'rocket'), ('globex', 'laser');
ALTER TABLE example_js.orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_reads ON example_js.orders FOR SELECT
    USING (tenant = (SELECT apikeys.current_owner())
           AND (SELECT apikeys.has_permission('orders', 'read')));
DO $$ BEGIN CREATE ROLE example_app; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT USAGE ON SCHEMA example_js TO example_app;
GRANT SELECT ON example_js.orders TO example_app;
`;

async function main() {
  const client = new Client({ connectionString: process.env.DATABASE_URL });
  await client.connect();
  try {
    await client.query(SETUP);

    // Create a key: the key string comes back once; the database keeps only its hash.
    const created = await client.query(
      'SELECT id, key FROM apikeys.create_api_key(owner => $1, permissions => $2)',
      ['acme', { orders: ['read'] }],
    );
    const { id, key } = created.rows[0];
    console.log(`created ${id}: ${key.slice(0, 10)}…`);

    // Verify it, requiring a permission. Bad keys never raise: valid is false, code says why.
    const verified = await client.query(
      'SELECT valid, code, owner FROM apikeys.verify_key($1, required => $2)',
      [key, { orders: ['read'] }],
    );
    console.log(`verify_key: ${verified.rows[0].code} (owner ${verified.rows[0].owner})`);
    assert.deepEqual(verified.rows[0], { valid: true, code: 'VALID', owner: 'acme' });
    const bad = await client.query("SELECT code FROM apikeys.verify_key('sk_not_a_key')");
    assert.equal(bad.rows[0].code, 'NOT_FOUND');

    // Mint a token carrying the key's access for one minute, and verify it.
    const minted = await client.query('SELECT apikeys.mint_token($1, 60000) AS token', [key]);
    const { token } = minted.rows[0];
    const checked = await client.query('SELECT code, claims FROM apikeys.verify_token($1)', [token]);
    console.log(`verify_token: ${checked.rows[0].code} (expires at ${checked.rows[0].claims.exp_ms} ms)`);
    assert.equal(checked.rows[0].code, 'VALID');
    assert.equal(checked.rows[0].claims.sub, 'acme');

    // Row-level security: the transaction authenticates with the token; the policy sees it.
    await client.query('BEGIN');
    await client.query('SET LOCAL ROLE example_app');
    await client.query('SELECT apikeys.authenticate($1)', [token]);
    const items = await client.query('SELECT item FROM example_js.orders ORDER BY item');
    await client.query('COMMIT');
    console.log(`acme sees: ${JSON.stringify(items.rows.map((r) => r.item))}`);
    assert.deepEqual(items.rows.map((r) => r.item), ['anvil', 'rocket']);

    // The identity ended with the transaction.
    await client.query('BEGIN');
    await client.query('SET LOCAL ROLE example_app');
    const after = await client.query('SELECT count(*)::int AS n FROM example_js.orders');
    await client.query('COMMIT');
    assert.equal(after.rows[0].n, 0);

    // A wrong credential is SQLSTATE 28000 and sets nothing.
    await assert.rejects(client.query("SELECT apikeys.authenticate('sk_not_a_key')"), (err) => {
      console.log(`bad key: ${err.code} ${err.message}`);
      return err.code === '28000';
    });
  } finally {
    await client.end();
  }
  console.log('node example: ok');
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
