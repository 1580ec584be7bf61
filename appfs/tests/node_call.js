'use strict';
// node node_call.js WORKLOAD.js < requests.json
// Loads WORKLOAD.js as the nodejs agent does (from its own directory) and
// calls its handle with each request of the JSON array on stdin; prints a
// JSON array of {"ok": result} or {"error": message}. A result must be a
// plain object that survives JSON.stringify, as the agent requires.

const fs = require('fs');
const path = require('path');

async function main() {
  const file = path.resolve(process.argv[2]);
  process.chdir(path.dirname(file));
  const mod = require(file);
  const handle = typeof mod.handle === 'function' ? mod.handle : mod.default && mod.default.handle;
  if (typeof handle !== 'function') throw new Error(`${file} exports no handle`);
  const requests = JSON.parse(fs.readFileSync(0, 'utf8'));
  const out = [];
  for (const request of requests) {
    try {
      const result = await handle(request);
      if (result === null || typeof result !== 'object' || Array.isArray(result)) {
        out.push({ error: `handle returned ${result === null ? 'null' : typeof result}, not an object` });
      } else {
        out.push({ ok: JSON.parse(JSON.stringify(result)) });
      }
    } catch (e) {
      out.push({ error: e instanceof Error ? `${e.name}: ${e.message}` : String(e) });
    }
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => {
  process.stderr.write(`${e.stack || e}\n`);
  process.exit(1);
});
