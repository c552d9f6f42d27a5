# The Cloud Run worker: the same app and worker code as App Engine, plus the tools App Engine lacks (the mariadb
# client for sqlsync's local profile; a share mounted by Cloud Run's NFS or GCS volume for directory copies).
# It serves the same /tasks/* routes, reached by HTTP-target tasks with an OIDC token (docs/deploy.md).
FROM python:3.13-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends mariadb-client ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements-pip.txt requirements.txt ./
RUN pip install --no-cache-dir --require-hashes -r requirements-pip.txt \
 && pip install --no-cache-dir --require-hashes -r requirements.txt

COPY . .
RUN useradd --system --uid 10001 backup && chown -R backup /app
USER backup

# Cloud Run sets PORT. A task may run up to the queue's dispatch deadline; gunicorn must not kill it first.
ENV BACKUP_QUEUE_BACKEND=cloudtasks BACKUP_TASKS_TARGET=http PYTHONUNBUFFERED=1
CMD exec gunicorn --bind :$PORT --workers 1 --threads 4 --timeout 0 --no-control-socket main:app
