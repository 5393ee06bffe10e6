// Command watchbench measures what open WatchOrder streams cost the order
// service: it places -n orders that stay PENDING (run the order service
// without inventory and with a long ORDER_DEADLINE_SECS), opens one watch per
// order over -conns HTTP/2 connections, and reads the service's RSS and CPU
// time from /proc/<pid> before, after opening, and after an idle minute;
// then it runs -finish (a shell command that decides every order) and
// measures how long until every watcher has received its final state and
// its stream has ended. Used by clients/bench-watchers.sh.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	orderv1 "shop.example/clients/go/shop/order/v1"
)

type usage struct {
	rssKiB int64
	cpu    time.Duration
}

func sample(pid int) usage {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		log.Fatalf("read status of %d: %v", pid, err)
	}
	var u usage
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			u.rssKiB, _ = strconv.ParseInt(strings.Fields(line)[1], 10, 64)
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		log.Fatalf("read stat of %d: %v", pid, err)
	}
	fields := strings.Fields(string(stat)[strings.LastIndexByte(string(stat), ')')+2:])
	utime, _ := strconv.ParseInt(fields[11], 10, 64)         // field 14 of stat
	stime, _ := strconv.ParseInt(fields[12], 10, 64)         // field 15
	u.cpu = time.Duration(utime+stime) * (time.Second / 100) // USER_HZ = 100
	return u
}

func main() {
	addr := flag.String("addr", "localhost:50051", "order service gRPC address")
	pid := flag.Int("pid", 0, "the order service's process id")
	n := flag.Int("n", 5000, "watchers (one order each)")
	conns := flag.Int("conns", 50, "HTTP/2 connections the watchers share")
	idle := flag.Duration("idle", 60*time.Second, "how long to hold the watchers open idle")
	finish := flag.String("finish", "", "shell command that decides every order")
	flag.Parse()
	if *pid == 0 {
		log.Fatal("-pid is required")
	}

	clients := make([]orderv1.OrderServiceClient, *conns)
	for i := range clients {
		conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			log.Fatal(err)
		}
		defer conn.Close()
		clients[i] = orderv1.NewOrderServiceClient(conn)
	}
	ctx := context.Background()

	ids := make([]string, *n)
	start := time.Now()
	var wg sync.WaitGroup
	for w := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < *n; i += 50 {
				o, err := clients[i%*conns].CreateOrder(ctx, &orderv1.CreateOrderRequest{
					CustomerId: fmt.Sprintf("BENCH%05d", i), ProductId: "PROD001", Quantity: 1,
				})
				if err != nil {
					log.Fatalf("CreateOrder: %v", err)
				}
				ids[i] = o.GetOrderId()
			}
		}()
	}
	wg.Wait()
	fmt.Printf("placed %d orders in %v\n", *n, time.Since(start).Round(time.Millisecond))

	// The service's own background work (relay, consumer, health checks)
	// over the same idle period, without watchers, for comparison.
	time.Sleep(2 * time.Second)
	quiet := sample(*pid)
	time.Sleep(*idle)
	before := sample(*pid)
	fmt.Printf("order CPU with no watcher: %v over %v idle\n", (before.cpu - quiet.cpu).Round(time.Millisecond), *idle)
	start = time.Now()
	var opened, finals, ended atomic.Int64
	var firstErr atomic.Value
	allOpen := make(chan struct{})
	done := make(chan struct{})
	for i, id := range ids {
		go func() {
			stream, err := clients[i%*conns].WatchOrder(ctx, &orderv1.WatchOrderRequest{OrderId: id})
			if err != nil {
				firstErr.CompareAndSwap(nil, err)
				return
			}
			for {
				o, err := stream.Recv()
				if errors.Is(err, io.EOF) {
					if ended.Add(1) == int64(*n) {
						close(done)
					}
					return
				}
				if err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				if o.GetStatus() == orderv1.OrderStatus_ORDER_STATUS_PENDING {
					if opened.Add(1) == int64(*n) {
						close(allOpen)
					}
				} else {
					finals.Add(1)
				}
			}
		}()
	}
	select {
	case <-allOpen:
	case <-time.After(120 * time.Second):
		log.Fatalf("only %d of %d watches opened; first error: %v", opened.Load(), *n, firstErr.Load())
	}
	openTime := time.Since(start)
	open := sample(*pid)
	time.Sleep(*idle)
	idled := sample(*pid)
	fmt.Printf("opened %d watches over %d connections in %v\n", *n, *conns, openTime.Round(time.Millisecond))
	fmt.Printf("order RSS: %d MiB before, %d MiB with %d watchers open (+%.1f KiB per watcher)\n",
		before.rssKiB/1024, open.rssKiB/1024, *n, float64(open.rssKiB-before.rssKiB)/float64(*n))
	fmt.Printf("order CPU: %v to open them; %v over %v idle with them open\n",
		(open.cpu - before.cpu).Round(time.Millisecond), (idled.cpu - open.cpu).Round(time.Millisecond), *idle)

	if *finish == "" {
		return
	}
	start = time.Now()
	cmd := exec.Command("sh", "-c", *finish)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		log.Fatalf("-finish: %v", err)
	}
	select {
	case <-done:
	case <-time.After(120 * time.Second):
		log.Fatalf("only %d of %d watches ended; first error: %v", ended.Load(), *n, firstErr.Load())
	}
	end := sample(*pid)
	fmt.Printf("all %d orders decided at once: every watcher got its final state and its stream ended %v later; order CPU %v for it\n",
		*n, time.Since(start).Round(time.Millisecond), (end.cpu - idled.cpu).Round(time.Millisecond))
	if f := finals.Load(); f != int64(*n) {
		log.Fatalf("%d final states for %d watchers", f, *n)
	}
}
