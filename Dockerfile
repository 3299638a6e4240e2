# One image for the API and the workers; the command picks the role. requirements.lock
# brings what the index needs: pg8000 (the PostgreSQL client), onnxruntime, tokenizers and
# the packaged embedding model (nothing is downloaded at run time); the index itself is a
# PostgreSQL-with-pgvector service reached by MORAG_INDEX_URL (docker/docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 1000 morag
WORKDIR /app
COPY requirements.lock ./
RUN pip install --no-deps --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps . && mkdir /data && chown morag:morag /data

USER morag
ENV MORAG_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
CMD ["morag", "api", "--host", "0.0.0.0"]
