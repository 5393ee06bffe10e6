// k6 load test of the gRPC API through server reflection (no proto files),
// at a constant arrival rate for a bounded time, loopback only.
//
//   k6 run -e ADDR=127.0.0.1:50051 -e RATE=300 -e DURATION=20s ghz/k6/grpc_orders.js
import grpc from 'k6/net/grpc';
import { check } from 'k6';
import exec from 'k6/execution';

const ADDR = __ENV.ADDR || '127.0.0.1:50051';
const RUN = __ENV.RUN || `k6g-${Date.now()}`;
const client = new grpc.Client();

export const options = {
  scenarios: {
    orders: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE || 300),
      timeUnit: '1s',
      duration: __ENV.DURATION || '20s',
      preAllocatedVUs: 50,
      maxVUs: 200,
    },
  },
  thresholds: {
    checks: ['rate>0.99'],
    grpc_req_duration: ['p(99)<500'],
  },
};

export default function () {
  if (exec.vu.iterationInScenario === 0) {
    client.connect(ADDR, { plaintext: true, reflect: true });
  }
  const n = exec.scenario.iterationInTest;
  const res = client.invoke('shop.order.v1.OrderService/CreateOrder', {
    customer_id: `${RUN}-${n}`,
    items: [{ product_id: n % 2 ? 'PROD013' : 'PROD014', quantity: 1 }],
  });
  check(res, {
    'status is OK': (r) => r && r.status === grpc.StatusOK,
    'order is PENDING': (r) => r && r.message.status === 'ORDER_STATUS_PENDING',
  });
}
