// Writes realm/server/static/realm-client.js: the SDK's tsc output (one ES module, no
// imports) with a header naming the SHA-256 of the source it was built from, so a test can
// tell that the committed bundle is current. Run by `npm run bundle` (after `npm run build`).
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const source = readFileSync(join(here, "src", "index.ts"));
const built = readFileSync(join(here, "dist", "index.js"), "utf8");
if (/^\s*import\s/m.test(built)) throw new Error("dist/index.js imports modules: not one file");
const version = JSON.parse(readFileSync(join(here, "package.json"), "utf8")).version;
const sha = createHash("sha256").update(source).digest("hex");
const out = resolve(here, "../../realm/server/static/realm-client.js");
const header =
  `// Realm JavaScript client ${version}: a build of clients/js/src/index.ts (npm run bundle).\n` +
  `// Do not edit: regenerate it. source-sha256: ${sha}\n`;
writeFileSync(out, header + built);
console.log(`${out}: ${Buffer.byteLength(header + built)} bytes`);
