// Calls the router from Node.js through clients generated from protos/ (see README.md here):
// one Predict, or the same request N times down one PredictStream, over gRPC (the router's
// port) or over the Connect protocol (`--protocol connect`: its HTTP port, SERVER__HTTP_PORT;
// protobuf bodies, or JSON with --json). Prints each answer as one line of protobuf JSON; a
// refusal as {"error": ...} with its code, reason and bad fields decoded from the status
// details, and exits 1.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { create, fromJson, toJson } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";
import {
  PredictRequestSchema,
  PredictResponseSchema,
  PredictStreamRequestSchema,
  RouterService,
} from "./gen/modelserve/router/v1/router_service_pb.js";

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: process.env.MODELSERVE_ROUTER ?? "127.0.0.1:50051" },
    request: { type: "string" },
    stream: { type: "string" },
    "api-key": { type: "string", default: process.env.MODELSERVE_API_KEY ?? "" },
    "timeout-ms": { type: "string", default: "2000" },
    protocol: { type: "string", default: "grpc" },
    json: { type: "boolean", default: false },
    // TLS to a router serving it (SERVER__TLS__*): the CA to trust, and for mutual TLS a
    // client certificate and key; the server name checked when it differs from the target's.
    "ca-file": { type: "string" },
    "cert-file": { type: "string" },
    "key-file": { type: "string" },
    "server-name": { type: "string" },
  },
});
if (!args.request || !["grpc", "connect"].includes(args.protocol)) {
  console.error(
    "usage: node predict.mjs --request '<PredictRequest as JSON>' [--stream N] " +
      "[--target host:port] [--api-key KEY] [--timeout-ms MS] [--protocol grpc|connect [--json]] " +
      "[--ca-file PEM [--cert-file PEM --key-file PEM] [--server-name NAME]]",
  );
  process.exit(2);
}

const tls = args["ca-file"] !== undefined;
const read = (path) => (path === undefined ? undefined : readFileSync(path));
const transportOptions = {
  baseUrl: `${tls ? "https" : "http"}://${args.target}`,
  nodeOptions: tls
    ? {
        ca: read(args["ca-file"]),
        cert: read(args["cert-file"]),
        key: read(args["key-file"]),
        servername: args["server-name"],
      }
    : undefined,
};
const client = createClient(
  RouterService,
  args.protocol === "connect"
    ? // The services' HTTP port speaks HTTP/1.1.
      createConnectTransport({
        ...transportOptions,
        httpVersion: "1.1",
        useBinaryFormat: !args.json,
      })
    : createGrpcTransport(transportOptions),
);
const options = {
  timeoutMs: Number(args["timeout-ms"]),
  headers: args["api-key"] ? { "x-api-key": args["api-key"] } : {},
};
const request = fromJson(PredictRequestSchema, JSON.parse(args.request));

/** A refusal with what its google.rpc details say. */
function refusal(error) {
  const info = error.findDetails(ErrorInfoSchema)[0];
  const badRequest = error.findDetails(BadRequestSchema)[0];
  const retry = error.findDetails(RetryInfoSchema)[0];
  return {
    code: Code[error.code],
    message: error.rawMessage,
    reason: info?.reason ?? "",
    domain: info?.domain ?? "",
    metadata: info?.metadata ?? {},
    fieldViolations: (badRequest?.fieldViolations ?? []).map((v) => ({
      field: v.field,
      description: v.description,
    })),
    retryDelaySeconds: retry?.retryDelay ? Number(retry.retryDelay.seconds) : null,
  };
}

async function* copies(count) {
  for (let i = 0; i < count; i++) {
    const copy = create(PredictRequestSchema, { ...request, requestId: `node-${i}` });
    yield create(PredictStreamRequestSchema, { request: copy });
  }
}

try {
  if (args.stream) {
    // Answers come as each is ready, not in order: match them by request id.
    for await (const item of client.predictStream(copies(Number(args.stream)), options)) {
      const { requestId, result } = item;
      if (result.case === "response") {
        console.log(
          JSON.stringify({ requestId, response: toJson(PredictResponseSchema, result.value) }),
        );
      } else {
        // A refused request of a stream: PredictError (its code is gRPC's number).
        const { code, message, reason } = result.value;
        console.log(JSON.stringify({ requestId, error: { code: Code[code], message, reason } }));
      }
    }
  } else {
    const response = await client.predict(request, options);
    console.log(JSON.stringify(toJson(PredictResponseSchema, response)));
  }
} catch (error) {
  if (!(error instanceof ConnectError)) throw error;
  console.log(JSON.stringify({ error: refusal(error) }));
  process.exit(1);
}
