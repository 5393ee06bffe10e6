"""Places an order with the order service over gRPC, then follows it with
WatchOrder until its final status and prints each state.

    python example.py --addr localhost:50051

Needs the stubs beside this file (clients/python/shop, generated from proto/
by clients/generate.sh) and grpcio, protobuf and googleapis-common-protos
(requirements.txt). Exits 0 once the order is CONFIRMED or CANCELLED.
"""

import argparse
import os
import sys

import grpc

from shop.order.v1 import order_pb2, order_pb2_grpc

FINAL = (order_pb2.ORDER_STATUS_CONFIRMED, order_pb2.ORDER_STATUS_CANCELLED)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=os.environ.get("ORDER_ADDR", "localhost:50051"))
    parser.add_argument("--customer", default="CUST001")
    parser.add_argument("--product", default="PROD001")
    parser.add_argument("--quantity", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds")
    args = parser.parse_args()

    with grpc.insecure_channel(args.addr) as channel:
        orders = order_pb2_grpc.OrderServiceStub(channel)
        created = orders.CreateOrder(
            order_pb2.CreateOrderRequest(
                customer_id=args.customer,
                product_id=args.product,
                quantity=args.quantity,
            ),
            timeout=args.timeout,
        )
        status = order_pb2.OrderStatus.Name
        print(
            f"placed order {created.order_id}: {status(created.status)}, "
            f"total {created.total.units} {created.total.currency}"
        )
        last = None
        # The server sends the current state, then each change, and ends the
        # stream after the final state.
        for order in orders.WatchOrder(
            order_pb2.WatchOrderRequest(order_id=created.order_id), timeout=args.timeout
        ):
            print(f"  {order.updated_at.ToJsonString()}  {status(order.status)}")
            last = order
    if last is None or last.status not in FINAL:
        print("the watch ended before a final status", file=sys.stderr)
        return 1
    reason = f" ({last.reason})" if last.reason else ""
    print(f"final: order {last.order_id} {status(last.status)}{reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
