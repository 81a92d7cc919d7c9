// A grpc-js client of Allot's quota service, built from the repository's protos/ alone (the
// google and grpc health protos it needs are vendored there): no generated code, no Allot
// package. It checks health, reports one usage event, reads the account's quota summary, and
// decodes google.rpc.ErrorInfo from a refused call. Prints one JSON object; exits 1 on failure.
//
//   ALLOT_QUOTA_ADDR=127.0.0.1:50051 ALLOT_TOKEN=<gateway token> \
//   ALLOT_ACCOUNT_TOKEN=<the account's token> ALLOT_ACCOUNT=acct-1 \
//   ALLOT_REGION=ap-southeast-1 ALLOT_API=passport node client.js
//
// The gateway reports usage; the account reads its own summary.
//
// docs/contract.md, "Clients in other languages".
"use strict";

const path = require("node:path");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTOS = process.env.ALLOT_PROTOS || path.join(__dirname, "..", "..", "protos");
const DEADLINE_MS = Number(process.env.ALLOT_DEADLINE_MS || 5000);

function need(name) {
  const value = process.env[name];
  if (!value) throw new Error(`set ${name}`);
  return value;
}

const definition = protoLoader.loadSync(
  ["allot/quota/v1/quota_service.proto", "grpc/health/v1/health.proto"],
  { includeDirs: [PROTOS], longs: String, enums: String, defaults: true, oneofs: true },
);
const loaded = grpc.loadPackageDefinition(definition);

// google.rpc.Status and its details, to read the `grpc-status-details-bin` trailer.
const details = new protobuf.Root();
details.resolvePath = (_origin, target) => path.join(PROTOS, target);
details.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
const Status = details.lookupType("google.rpc.Status");

function errorInfo(error) {
  const [raw] = (error.metadata && error.metadata.get("grpc-status-details-bin")) || [];
  if (!raw) return null;
  for (const any of Status.decode(raw).details) {
    const name = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    if (name === "google.rpc.ErrorInfo") {
      const info = details.lookupType(name).decode(any.value);
      return { reason: info.reason, domain: info.domain, metadata: info.metadata };
    }
  }
  return null;
}

function bearer(token) {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

// Every call has a deadline, and carries the token as bearer metadata.
function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](
      request,
      metadata,
      { deadline: new Date(Date.now() + DEADLINE_MS) },
      (error, reply) => (error ? reject(error) : resolve(reply)),
    );
  });
}

async function main() {
  const addr = need("ALLOT_QUOTA_ADDR");
  const account = need("ALLOT_ACCOUNT");
  const region = need("ALLOT_REGION");
  const api = need("ALLOT_API");
  const metadata = bearer(need("ALLOT_TOKEN"));
  const accountMetadata = bearer(need("ALLOT_ACCOUNT_TOKEN"));

  const credentials = grpc.credentials.createInsecure();
  const health = new loaded.grpc.health.v1.Health(addr, credentials);
  const quota = new loaded.allot.quota.v1.QuotaService(addr, credentials);
  const out = {};
  try {
    out.health = (await call(health, "Check", { service: "" }, new grpc.Metadata())).status;

    const eventId = `node-${crypto.randomUUID()}`;
    const report = await call(
      quota,
      "ReportUsage",
      { eventId, accountId: account, region, api, quantity: 1, httpStatus: 200 },
      metadata,
    );
    out.report = {
      eventId: report.eventId,
      duplicate: report.duplicate,
      deductions: report.deductions.map((d) => ({ packageId: d.packageId, quantity: d.quantity })),
      payPerUseQuantity: report.payPerUseQuantity,
    };

    const summary = await call(quota, "GetQuotaSummary", {}, accountMetadata);
    out.summary = {
      accountId: summary.accountId,
      items: summary.items.map((i) => ({
        region: i.region,
        api: i.api,
        totalQuantity: i.totalQuantity,
        usedQuantity: i.usedQuantity,
        remainingQuantity: i.remainingQuantity,
      })),
    };

    // Refused: no event_id. The status carries ErrorInfo (reason, domain "allot", metadata).
    try {
      await call(quota, "ReportUsage", { accountId: account, region, api, httpStatus: 200 }, metadata);
      throw new Error("a ReportUsage without event_id was accepted");
    } catch (error) {
      if (error.code === undefined) throw error;
      out.refused = { code: grpc.status[error.code], errorInfo: errorInfo(error) };
    }
  } finally {
    health.close();
    quota.close();
  }
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
