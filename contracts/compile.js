#!/usr/bin/env node
// Compiles every contracts/src/**/*.sol with the pinned npm `solc` (no network, no native solc)
// and writes one artifact per deployable contract to contracts/artifacts/<ContractName>.json.
//
//   node contracts/compile.js                 # (re)write the artifacts
//   node contracts/compile.js --check         # compile in memory; exit 1 and list every artifact
//                                             # that differs from the committed one
//   node contracts/compile.js --out DIR       # write/check DIR instead of contracts/artifacts
//
// The output is a pure function of the source texts and the compiler: sources are fed in sorted
// order under repo-relative names, and the metadata hash is disabled, so absolute paths or the
// checkout location never leak into the bytecode. Exit codes: 0 ok, 1 --check found drift,
// 2 compile error or bad usage.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");

const ROOT = path.resolve(__dirname, "..");
const SRC_DIR = path.join(ROOT, "contracts", "src");
const DEFAULT_OUT_DIR = path.join(ROOT, "contracts", "artifacts");
const COMPILER_VERSION = "0.8.37";

function fail(message) {
  process.stderr.write(`compile.js: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = { check: false, outDir: DEFAULT_OUT_DIR };
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === "--check") args.check = true;
    else if (argv[i] === "--out" && i + 1 < argv.length) args.outDir = path.resolve(argv[++i]);
    else fail(`unknown argument ${argv[i]} (usage: compile.js [--check] [--out DIR])`);
  }
  return args;
}

function loadSolc() {
  let solc;
  try {
    solc = require(require.resolve("solc", { paths: [ROOT] }));
  } catch (err) {
    fail(`npm package solc not found (run \`npm ci\` in ${ROOT}): ${err.message}`);
  }
  const version = solc.version();
  if (!version.startsWith(`${COMPILER_VERSION}+`)) {
    fail(`expected solc ${COMPILER_VERSION}, found ${version}`);
  }
  return solc;
}

// Repo-relative POSIX paths of all .sol files under contracts/src, sorted.
function findSources(dir) {
  const found = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) found.push(...findSources(full));
    else if (entry.isFile() && entry.name.endsWith(".sol")) {
      found.push(path.relative(ROOT, full).split(path.sep).join("/"));
    }
  }
  return found.sort();
}

function compile(solc, sourceNames) {
  const sources = {};
  for (const name of sourceNames) {
    sources[name] = { content: fs.readFileSync(path.join(ROOT, name), "utf8") };
  }
  const input = {
    language: "Solidity",
    sources,
    settings: {
      optimizer: { enabled: true, runs: 200 },
      evmVersion: "cancun",
      metadata: { bytecodeHash: "none" },
      outputSelection: {
        "*": {
          "": ["ast"],
          "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"],
        },
      },
    },
  };
  // Every import must resolve to one of the sources above: nothing is read from elsewhere.
  const findImports = (importPath) => ({
    error: `import ${importPath} is not under contracts/src`,
  });
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const diagnostics = output.errors || [];
  for (const d of diagnostics) process.stderr.write(`${d.formattedMessage || d.message}\n`);
  if (diagnostics.some((d) => d.severity === "error")) fail("compilation failed");
  return { sources, output };
}

// Names of concrete contracts (not libraries, interfaces or abstract contracts) per source.
function deployableContracts(ast) {
  return ast.nodes
    .filter((n) => n.nodeType === "ContractDefinition")
    .filter((n) => n.contractKind === "contract" && !n.abstract)
    .map((n) => n.name);
}

// Sorted object keys at every level; array order is meaningful in an ABI and kept.
function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical);
  if (value !== null && typeof value === "object") {
    const sorted = {};
    for (const key of Object.keys(value).sort()) sorted[key] = canonical(value[key]);
    return sorted;
  }
  return value;
}

function buildArtifacts(solc) {
  const sourceNames = findSources(SRC_DIR);
  if (sourceNames.length === 0) fail(`no .sol files under ${SRC_DIR}`);
  const { sources, output } = compile(solc, sourceNames);
  const artifacts = new Map(); // file name -> text
  for (const sourcePath of sourceNames) {
    const sourceSha256 = crypto.createHash("sha256").update(sources[sourcePath].content, "utf8").digest("hex");
    for (const contractName of deployableContracts(output.sources[sourcePath].ast)) {
      const fileName = `${contractName}.json`;
      if (artifacts.has(fileName)) fail(`contract name ${contractName} is defined twice`);
      const compiled = output.contracts[sourcePath][contractName];
      const artifact = {
        contractName,
        sourcePath,
        abi: canonical(compiled.abi),
        bytecode: `0x${compiled.evm.bytecode.object}`,
        deployedBytecode: `0x${compiled.evm.deployedBytecode.object}`,
        compiler: COMPILER_VERSION,
        sourceSha256,
      };
      artifacts.set(fileName, `${JSON.stringify(artifact, null, 2)}\n`);
    }
  }
  return artifacts;
}

function existingArtifactFiles(outDir) {
  if (!fs.existsSync(outDir)) return [];
  return fs.readdirSync(outDir).filter((f) => f.endsWith(".json")).sort();
}

function check(artifacts, outDir) {
  const problems = [];
  for (const [fileName, text] of [...artifacts].sort()) {
    const file = path.join(outDir, fileName);
    if (!fs.existsSync(file)) problems.push(`${fileName}: missing`);
    else if (fs.readFileSync(file, "utf8") !== text) problems.push(`${fileName}: differs from sources`);
  }
  for (const fileName of existingArtifactFiles(outDir)) {
    if (!artifacts.has(fileName)) problems.push(`${fileName}: no contract of that name in contracts/src`);
  }
  if (problems.length > 0) {
    process.stdout.write(`artifacts out of date (run \`node contracts/compile.js\`):\n`);
    for (const p of problems) process.stdout.write(`  ${p}\n`);
    return 1;
  }
  process.stdout.write(`${artifacts.size} artifacts match the sources\n`);
  return 0;
}

function write(artifacts, outDir) {
  fs.mkdirSync(outDir, { recursive: true });
  for (const fileName of existingArtifactFiles(outDir)) {
    if (!artifacts.has(fileName)) {
      fs.unlinkSync(path.join(outDir, fileName));
      process.stdout.write(`removed ${fileName}\n`);
    }
  }
  for (const [fileName, text] of [...artifacts].sort()) {
    fs.writeFileSync(path.join(outDir, fileName), text);
    process.stdout.write(`wrote ${path.relative(ROOT, path.join(outDir, fileName))}\n`);
  }
  return 0;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const artifacts = buildArtifacts(loadSolc());
  process.exitCode = args.check ? check(artifacts, args.outDir) : write(artifacts, args.outDir);
}

main();
