// Test oracle: the npm @openzeppelin/merkle-tree package (pinned in package.json), driven by JSON.
// stdin: a JSON list of jobs; stdout: a JSON list of results, one per job, in order.
//   {"op": "build", "encoding": [...], "values": [[...], ...]}
//       -> {"root", "dump", "dumpJson" (JSON.stringify(tree.dump())), "proofs": [[...], ...]}
//   {"op": "load", "dump": {...}}         -> {"ok": true, "root"} | {"ok": false, "error"}
//   {"op": "verify", "root", "encoding", "value", "proof"} -> {"ok": bool}
"use strict";
const { StandardMerkleTree } = require("@openzeppelin/merkle-tree");

function run(job) {
  switch (job.op) {
    case "build": {
      const tree = StandardMerkleTree.of(job.values, job.encoding);
      const dump = tree.dump();
      return {
        root: tree.root,
        dump,
        dumpJson: JSON.stringify(dump),
        proofs: job.values.map((_, i) => tree.getProof(i)),
      };
    }
    case "load":
      try {
        return { ok: true, root: StandardMerkleTree.load(job.dump).root };
      } catch (error) {
        return { ok: false, error: String(error && error.message) };
      }
    case "verify":
      return { ok: StandardMerkleTree.verify(job.root, job.encoding, job.value, job.proof) };
    default:
      throw new Error(`unknown op ${job.op}`);
  }
}

const chunks = [];
process.stdin.on("data", chunk => chunks.push(chunk));
process.stdin.on("end", () => {
  const jobs = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  process.stdout.write(JSON.stringify(jobs.map(run)));
});
