// Where the servers under test are: the harness (tests/clients/test_other_languages.py) starts a
// real policy and trainer server and passes their addresses in the environment.

import { existsSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const POLICY = process.env.TOKENFEEDBACK_POLICY_ADDR ?? "";
export const TRAINER = process.env.TOKENFEEDBACK_TRAINER_ADDR ?? "";
/** node:test's `skip` option: a reason when the harness did not give the servers. */
export const NEEDS_SERVERS = POLICY && TRAINER ? false : "TOKENFEEDBACK_POLICY_ADDR / TOKENFEEDBACK_TRAINER_ADDR not set";

// dist/test/env.js -> the repository root is four levels up.
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
export const VECTORS_DIR = process.env.TOKENFEEDBACK_VECTORS_DIR ?? resolve(ROOT, "tests/vectors");
export const HAVE_VECTORS = existsSync(VECTORS_DIR);

/** A unique prefix for annotation ids, so reruns against the same trainer do not collide. */
export const RUN = `ts-${process.pid}-${Date.now().toString(36)}`;

/** A 127.0.0.1 port that nothing listens on (bound, then released). */
export async function closedPort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => resolvePort(port));
    });
  });
}
