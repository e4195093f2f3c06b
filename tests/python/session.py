"""A third-party client: Python grpcio stubs generated from proto/ with grpcio-tools.

Usage: session.py ADDR PROTO_DIR EVENTS_FILE FROM_MS TO_MS
Keys come from TALLY_PROVIDER_KEY (the provider of the events) and TALLY_INGEST_KEY.

Runs a scripted session against a running server and prints one JSON document:
- health: the grpc.health.v1 status of the server;
- services: the services listed by reflection;
- acks: counts of the Publish acknowledgements by status and reason;
- rows: every provider_window 1h row of [FROM_MS, TO_MS) through ListWindows
  (paged), in the export's shape (provider_id left out, unset metrics left out);
- summary: Summarize of provider_window over [FROM_MS, TO_MS);
- watched: product_window 1h rows as a Watch subscriber holds them once it has seen
  the epoch of the last acknowledgement (snapshot plus changes applied).
"""

import json
import os
import sys
import time
import tempfile
import threading
import importlib.resources

from grpc_tools import protoc


def generate(proto_dir, out):
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    files = [os.path.join("tally/v1", f) for f in ("common.proto", "query.proto", "ingest.proto", "admin.proto")]
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}"] + files)
    if rc != 0:
        raise SystemExit(f"protoc failed ({rc})")
    sys.path.insert(0, out)


def main():
    addr, proto_dir, events_file, from_ms, to_ms = sys.argv[1:6]
    from_ms, to_ms = int(from_ms), int(to_ms)
    out = tempfile.mkdtemp()
    generate(proto_dir, out)

    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from tally.v1 import query_pb2, query_pb2_grpc, ingest_pb2, ingest_pb2_grpc

    provider = [("authorization", "Bearer " + os.environ["TALLY_PROVIDER_KEY"])]
    ingest = [("authorization", "Bearer " + os.environ["TALLY_INGEST_KEY"])]
    channel = grpc.insecure_channel(addr)
    grpc.channel_ready_future(channel).result(timeout=30)
    result = {}

    # Readiness is eventual, as for any probe: the server turns SERVING once its
    # store is open (checked every 200 ms). Ask until it does, for at most 10 s.
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 10
    while True:
        status = health.Check(health_pb2.HealthCheckRequest(service="tally.v1.Query"), timeout=10)
        if status.status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    result["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    result["services"] = sorted(s.name for a in answers for s in a.list_services_response.service)

    def ts(ms):
        t = Timestamp()
        t.FromMilliseconds(ms)
        return t

    def iso(t):
        return t.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")

    def row_dict(r):
        d = {"view": r.view, "window": r.window, "window_start": iso(r.window_start)}
        for g in r.group:
            d[g.field] = g.value
        if r.rank:
            d["rank"] = r.rank
            d["product_id"] = r.member
        m = r.metrics
        for f in ("sales_count", "gross_amount", "refunds_count", "refunds_amount", "net_amount",
                  "distinct_customers", "min_ticket", "max_ticket"):
            if m.HasField(f):
                d[f] = getattr(m, f)
        return d

    query = query_pb2_grpc.QueryStub(channel)

    # Watch first, in its own thread, so it sees the published events arrive.
    watched = {}
    state = {"epoch": 0, "snapshots": 0, "order_ok": True}
    last_epoch = threading.Event()
    target = {"epoch": None}
    cond = threading.Condition()

    def watch():
        req = query_pb2.WatchRequest(view="product_window", window="1h", resume_after_epoch=0)
        getattr(req, "from").CopyFrom(ts(from_ms))
        for ev in query.Watch(req, metadata=provider):
            if ev.kind == query_pb2.WatchEvent.SNAPSHOT:
                if state["epoch"] != ev.epoch or state["snapshots"] == 0:
                    watched.clear()
                if ev.end_of_snapshot:
                    state["snapshots"] += 1
            elif state["epoch"] and ev.epoch != state["epoch"] + 1:
                state["order_ok"] = False
            for c in ev.changes:
                r = c.row
                key = (iso(r.window_start), tuple((g.field, g.value) for g in r.group), r.rank)
                if c.deleted:
                    watched.pop(key, None)
                else:
                    watched[key] = row_dict(r)
            with cond:
                state["epoch"] = ev.epoch
                cond.notify_all()
                if target["epoch"] is not None and ev.epoch >= target["epoch"]:
                    return

    w = threading.Thread(target=watch, daemon=True)
    w.start()

    # Publish every line of the file; acknowledgements come back as epochs commit.
    publisher = ingest_pb2_grpc.IngestStub(channel)
    with open(events_file, "rb") as f:
        lines = [l.rstrip(b"\n") for l in f if l.strip()]
    requests = (ingest_pb2.PublishRequest(sequence=i, event=l) for i, l in enumerate(lines))
    acks = {}
    last = 0
    seqs = []
    for a in publisher.Publish(requests, metadata=ingest, timeout=120):
        name = ingest_pb2.PublishAck.Status.Name(a.status)
        k = name if not a.reason else f"{name}:{a.reason}"
        acks[k] = acks.get(k, 0) + 1
        last = max(last, a.epoch)
        seqs.append(a.sequence)
    result["acks"] = acks
    result["acks_in_order"] = seqs == list(range(len(lines)))

    rows = []
    token = ""
    while True:
        req = query_pb2.ListWindowsRequest(view="provider_window", window="1h", page_size=50, page_token=token)
        getattr(req, "from").CopyFrom(ts(from_ms))
        req.to.CopyFrom(ts(to_ms))
        resp = query.ListWindows(req, metadata=provider, timeout=10)
        rows.extend(row_dict(r) for r in resp.rows)
        token = resp.next_page_token
        if not token:
            break
    result["rows"] = rows

    req = query_pb2.SummarizeRequest(view="provider_window")
    getattr(req, "from").CopyFrom(ts(from_ms))
    req.to.CopyFrom(ts(to_ms))
    s = query.Summarize(req, metadata=provider, timeout=10)
    result["summary"] = [
        {**{g.field: g.value for g in x.group}, "sales_count": x.metrics.sales_count, "net_amount": x.metrics.net_amount}
        for x in s.summaries
    ]
    result["covered"] = [s.covered_from.ToMilliseconds(), s.covered_to.ToMilliseconds()]

    with cond:
        target["epoch"] = last
        cond.wait_for(lambda: state["epoch"] >= last, timeout=30)
    result["watched"] = sorted(watched.values(), key=lambda d: json.dumps(d, sort_keys=True))
    result["watch_epoch"] = state["epoch"]
    result["last_ack_epoch"] = last
    result["watch_order_ok"] = state["order_ok"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
