# syntax=docker/dockerfile:1
# SSE gateway image. Every RUN step is a plain shell step, so it can also be
# run (and is tested) outside Docker.

# Node 24 (LTS): Node 20 reached its end of life in April 2026. The gateway
# also runs on Node 20 and later (package.json engines).
# --- build: compile TypeScript with the dev dependencies ----------------------
FROM node:24-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY . .
RUN npm run build \
 && mkdir -p public

# --- runtime: production dependencies and compiled code only ------------------
FROM node:24-bookworm-slim
ENV NODE_ENV=production PORT=3000 HOST=0.0.0.0
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund \
 && npm cache clean --force
COPY --from=build /app/dist ./dist
COPY --from=build /app/public ./public
COPY --from=build /app/scripts ./scripts

# Files stay owned by root; the process runs as the image's unprivileged user.
USER node
EXPOSE 3000

# No curl in the slim image: Node does the probe, at HOST (loopback when
# HOST listens on every address) and PORT. http.get, not fetch: a URL
# cannot carry an IPv6 zone id (fe80::1%eth0), a host option can.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD node -e "const h=process.env.HOST||'';require('http').get({host:h===''||h==='0.0.0.0'||h==='::'?'127.0.0.1':h,port:process.env.PORT||3000,path:'/health',timeout:2500},r=>process.exit(r.statusCode===200?0:1)).on('timeout',()=>process.exit(1)).on('error',()=>process.exit(1))"

# On SIGTERM the gateway stops accepting streams, sends `shutdown` to each open
# stream, closes them and exits 0 within SHUTDOWN_TIMEOUT_MS (default 10 s).
# Keep SHUTDOWN_TIMEOUT_MS below the orchestrator's grace period (`docker stop -t`,
# compose `stop_grace_period`, Kubernetes `terminationGracePeriodSeconds`), or
# the process is SIGKILLed mid-drain. Docker's default grace is 10 s, so the
# compose file sets stop_grace_period: 15s.
STOPSIGNAL SIGTERM
# Exec form: node is PID 1 and receives the signal itself (from its first
# module on, tens of milliseconds after the start; `docker run --init` or
# compose's `init: true` covers the instant before). The young
# generation is capped at 8 MB semi-spaces (as `npm start` does): V8 would grow
# it to 16 MB under the allocation bursts of opening thousands of streams,
# which is RSS that idle streams then pay for.
CMD ["node", "--max-semi-space-size=8", "dist/src/server.js"]
