// Command example places an order with the order service over gRPC, then
// follows it with WatchOrder until its final status and prints each state.
//
//	go run ./cmd/example -addr localhost:50051
//
// It exits 0 once the order is CONFIRMED or CANCELLED, 1 on any error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	orderv1 "shop.example/clients/go/shop/order/v1"
)

func main() {
	addr := flag.String("addr", envOr("ORDER_ADDR", "localhost:50051"), "order service gRPC address")
	customer := flag.String("customer", "CUST001", "customer id")
	product := flag.String("product", "PROD001", "product id")
	quantity := flag.Int("quantity", 1, "units of the product")
	timeout := flag.Duration("timeout", 60*time.Second, "give up after this long")
	flag.Parse()

	if err := run(*addr, *customer, *product, int32(*quantity), *timeout); err != nil {
		log.Fatalf("example: %v", err)
	}
}

func run(addr, customer, product string, quantity int32, timeout time.Duration) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connect to %s: %w", addr, err)
	}
	defer conn.Close()
	client := orderv1.NewOrderServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	created, err := client.CreateOrder(ctx, &orderv1.CreateOrderRequest{
		CustomerId: customer,
		ProductId:  product,
		Quantity:   quantity,
	})
	if err != nil {
		return fmt.Errorf("CreateOrder: %w", err)
	}
	fmt.Printf("placed order %s: %s, total %d %s\n", created.GetOrderId(), created.GetStatus(),
		created.GetTotal().GetUnits(), created.GetTotal().GetCurrency())

	stream, err := client.WatchOrder(ctx, &orderv1.WatchOrderRequest{OrderId: created.GetOrderId()})
	if err != nil {
		return fmt.Errorf("WatchOrder: %w", err)
	}
	var last *orderv1.Order
	for {
		order, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break // the server ends the stream after the final state
		}
		if err != nil {
			return fmt.Errorf("WatchOrder stream: %w", err)
		}
		fmt.Printf("  %s  %s\n", order.GetUpdatedAt().AsTime().Format(time.RFC3339Nano), order.GetStatus())
		last = order
	}
	switch last.GetStatus() {
	case orderv1.OrderStatus_ORDER_STATUS_CONFIRMED:
		fmt.Printf("final: order %s CONFIRMED\n", last.GetOrderId())
	case orderv1.OrderStatus_ORDER_STATUS_CANCELLED:
		fmt.Printf("final: order %s CANCELLED (%s)\n", last.GetOrderId(), last.GetReason())
	default:
		return fmt.Errorf("the watch ended before a final status (last: %v)", last.GetStatus())
	}
	return nil
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}
