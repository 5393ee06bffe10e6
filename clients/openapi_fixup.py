"""What clients/openapi.yaml cannot say: CreateOrder answers 201, never the
200 protoc-gen-openapiv2 always adds; WatchOrder's 200 is a stream of
Server-Sent Events, whose parsed shape (a list of events, each with an event
name and a data line) the schema states, with the Order in each `data` as
proto3 JSON text. Writes byte-stable JSON."""

import json
import sys

source, target = sys.argv[1], sys.argv[2]
with open(source, encoding="utf-8") as f:
    doc = json.load(f)

del doc["paths"]["/api/v1/orders"]["post"]["responses"]["200"]

sse = doc["paths"]["/api/v1/orders/{orderId}/events"]["get"]["responses"]["200"]
sse["schema"] = {
    "type": "array",
    "title": "Server-Sent Events",
    "items": {
        "type": "object",
        "properties": {
            "event": {
                "type": "string",
                "enum": ["message", "error"],
                "description": "message: data is an Order; error: data is a Status, and the stream ends.",
            },
            "data": {
                "type": "string",
                "description": "One line of JSON: an Order (proto3 JSON), or a Status for an error event.",
            },
        },
        "required": ["data"],
    },
}

with open(target, "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=2, ensure_ascii=False)
    f.write("\n")
