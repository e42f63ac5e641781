# The pipeline's image: one image for every process (`python -m pipeline api | worker --all | simulator | migrate |
# topics apply ...`); docker-compose.kafka.yml runs it under its "pipeline" profile. No Docker engine runs in CI
# here: tests/stack/test_compose.py checks this file statically.
#
#   docker build -t notify-pipeline .
#   docker run --rm --network host notify-pipeline config
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# pipeline/config/catalogue.py's REPO_ROOT is the folder above the `pipeline` package, and the processes read files under it
# at runtime: schemas/ (serde), topics/ (topics), infra/migrations/ (migrate), infra/policies/ (rate limits) and
# connectors/simulator/keys/ (the simulator's test credentials). So the tree is copied as in the repository and
# installed in place (-e): REPO_ROOT is /app, not site-packages. The lock pins every dependency (as `make` does).
COPY pyproject.toml requirements.lock README.md ./
COPY pipeline/ pipeline/
COPY connectors/ connectors/
COPY schemas/ schemas/
COPY topics/ topics/
COPY templates/ templates/
COPY infra/migrations/ infra/migrations/
COPY infra/policies/ infra/policies/
RUN pip install -c requirements.lock -e . \
    && python -m compileall -q pipeline connectors \
    && useradd --create-home --uid 10001 notify

# Nothing under /app is written at runtime: the files stay root's, the processes run as `notify`.
USER notify

ENTRYPOINT ["python", "-m", "pipeline"]
CMD ["--help"]
