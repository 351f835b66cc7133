# syntax=docker/dockerfile:1
# Devnet chain for deploy/docker-compose.yml (profile `devnet`, local use only): anvil from the
# project's pinned npm package (@foundry-rs/anvil-linux-amd64, package-lock.json), acting as
# Base Sepolia (chain 84532) with a block every 2 seconds like Base.
# Build from the repository root: docker build -f deploy/anvil.Dockerfile .
FROM node:20-bookworm-slim
WORKDIR /opt/devnet
COPY package.json package-lock.json ./
# `npm ci` installs exactly the locked versions (integrity-checked); solc comes along, unused.
RUN npm ci --no-audit --no-fund --loglevel=error \
    && ln -s /opt/devnet/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil /usr/local/bin/anvil \
    && anvil --version
USER node
EXPOSE 8545
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=5 \
    CMD ["node", "-e", "fetch('http://127.0.0.1:8545', {method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify({jsonrpc: '2.0', id: 1, method: 'eth_chainId', params: []})}).then(r => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["anvil", "--host", "0.0.0.0", "--port", "8545", "--chain-id", "84532"]
CMD ["--block-time", "2"]
