// Validates prometheus-operator objects (ServiceMonitor, PodMonitor) against the CRD schemas that
// the @kubernetes-models/prometheus-operator package generates from prometheus-operator's API.
//
//   node deploy/checks/validate_monitors.mjs NODE_MODULES monitors.yaml
//
// NODE_MODULES holds @kubernetes-models/prometheus-operator and js-yaml (`cargo xtask validators`
// provisions it). Prints one line per object; exits 1 when any object is invalid or of a kind
// without a model, and when the file holds no object at all.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, file] = process.argv.slice(2);
if (!modules || !file) {
  console.error("usage: validate_monitors.mjs NODE_MODULES FILE.yaml");
  process.exit(2);
}
const require = createRequire(join(modules, "..", "package.json"));
const yaml = require("js-yaml");

// The models, by apiVersion and kind (the package's ES modules, loaded by file).
const models = {
  "monitoring.coreos.com/v1": {
    ServiceMonitor: "monitoring.coreos.com/v1/ServiceMonitor.js",
    PodMonitor: "monitoring.coreos.com/v1/PodMonitor.js",
  },
};

const docs = yaml.loadAll(readFileSync(file, "utf8")).filter((d) => d != null);
if (docs.length === 0) {
  console.error(`${file}: no objects to validate`);
  process.exit(1);
}
let invalid = 0;
for (const doc of docs) {
  const what = `${doc.apiVersion} ${doc.kind}/${doc.metadata?.name}`;
  const rel = models[doc.apiVersion]?.[doc.kind];
  if (!rel) {
    console.error(`no schema for ${what}`);
    invalid++;
    continue;
  }
  const url = pathToFileURL(join(modules, "@kubernetes-models/prometheus-operator", rel)).href;
  const Model = (await import(url))[doc.kind];
  try {
    new Model(doc).validate();
    console.log(`valid ${what}`);
  } catch (e) {
    console.error(`invalid ${what}: ${e.message}`);
    invalid++;
  }
}
process.exit(invalid ? 1 : 0);
