# graddiag: one image for the API (`graddiag serve`) and the workers (`graddiag worker`).
#
#   docker build -t graddiag .                                   # CPU torch (the default)
#   docker build -t graddiag:gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .   # CUDA torch
#
# Build arguments:
#   TORCH_INDEX_URL  where torch and torchvision come from. The default, PyTorch's CPU index, keeps the
#                    image small (no CUDA libraries); PyPI's Linux wheels bundle CUDA.
#   CONSTRAINTS      the pip constraints file that pins the builds (torch, torchvision), as `make install`.
#   EXTRAS           comma-separated optional extras of pyproject.toml to install ("" for none);
#                    tensorboard serves GET /v1/runs/{id}/tensorboard.
#
# Layers: the dependencies are installed from pyproject.toml + the constraints before any source is
# copied, so editing the code rebuilds only the last, small layers.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG CONSTRAINTS=constraints.txt
ARG EXTRAS=tensorboard

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The unprivileged user the service runs as (uid 10001; USER below names it by number, so runAsNonRoot
# checks can verify it). /data (the SQLite volume) and /cache (decoded data sets) belong to it, so named
# volumes mounted there start out writable by it.
RUN groupadd --system --gid 10001 graddiag \
    && useradd --system --uid 10001 --gid graddiag --create-home --home-dir /home/graddiag graddiag \
    && mkdir -p /data /cache \
    && chown graddiag:graddiag /data /cache

WORKDIR /app

# 1. Dependencies only: the project's requirements (and those of EXTRAS) read from pyproject.toml.
COPY pyproject.toml constraints.txt ./
RUN python -c "import os, sys, tomllib; \
project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e.strip() for e in os.environ['EXTRAS'].split(',') if e.strip()]; \
optional = project.get('optional-dependencies', {}); \
missing = [e for e in extras if e not in optional]; \
missing and sys.exit(f'EXTRAS names extras pyproject.toml lacks: {missing}'); \
print('\n'.join(project['dependencies'] + [d for e in extras for d in optional[e]]))" > /tmp/requirements.txt \
    && pip install --index-url "$TORCH_INDEX_URL" -c "$CONSTRAINTS" torch torchvision \
    && pip install -c "$CONSTRAINTS" -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 2. The source. An editable install keeps the package in /app: graddiag/ links models/, service/ and
#    migrations/ into the one import name, and the service migrates the database on start from there.
COPY graddiag ./graddiag
COPY models ./models
COPY service ./service
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install --no-deps -c "$CONSTRAINTS" -e . && graddiag --help > /dev/null

USER 10001:10001

# In the container the defaults point at the volumes; docker-compose.yml sets them too.
ENV GRADDIAG_DB_URL=sqlite:////data/graddiag.db \
    GRADDIAG_CACHE_DIR=/cache

EXPOSE 8000

# The API alone; workers run as their own containers (`graddiag worker`, see docker-compose.yml).
# No HEALTHCHECK here: the worker shares this image and serves no HTTP; compose checks the API.
CMD ["graddiag", "serve", "--workers", "0", "--host", "0.0.0.0", "--port", "8000"]
