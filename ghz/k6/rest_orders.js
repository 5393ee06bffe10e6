// k6 load test of the REST shim: POST /api/v1/orders, the original system's
// request, at a constant arrival rate for a bounded time, loopback only.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8081 -e RATE=300 -e DURATION=20s ghz/k6/rest_orders.js
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';

const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8081';
const RUN = __ENV.RUN || `k6-${Date.now()}`;

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
    http_req_failed: ['rate<0.01'],
    'http_req_duration{expected_response:true}': ['p(99)<500'],
  },
};

export default function () {
  const n = exec.scenario.iterationInTest;
  const body = JSON.stringify({
    customer_id: `${RUN}-${n}`,
    product_id: n % 2 ? 'PROD013' : 'PROD014',
    quantity: 1,
  });
  const res = http.post(`${BASE_URL}/api/v1/orders`, body, {
    headers: { 'Content-Type': 'application/json', 'Idempotency-Key': `${RUN}-${n}` },
  });
  check(res, {
    'status is 201': (r) => r.status === 201,
    'order is PENDING': (r) => r.json('status') === 'ORDER_STATUS_PENDING',
  });
}
