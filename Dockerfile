# Loom on a GPU host: `docker compose up` (see docker-compose.yml). Versions come from requirements.lock, the
# same lock `make install` and CI install from; on Linux x86_64 its torch==2.13.0 resolves to PyPI's CUDA
# wheel, which carries its own CUDA runtime (pip adds the CUDA libraries that wheel needs); the host needs
# only the driver and the NVIDIA container toolkit.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/hf

WORKDIR /opt/loom
# The locked stack first, in its own layer: code changes do not reinstall it.
COPY requirements.lock ./
RUN pip install --upgrade pip && pip install -r requirements.lock
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY router ./router
COPY shard ./shard
COPY launcher ./launcher
COPY common ./common
RUN pip install --no-deps .

EXPOSE 8080
# Inside the container the router must listen on every interface; publish the port with care and set
# LOOM_API_KEY when it is reachable from other machines.
ENTRYPOINT ["loom", "--hostname", "0.0.0.0", "--port", "8080"]
