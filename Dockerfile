# cms-ingest: multi-stage build; the final image has no compilers and runs as a numeric user.
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/cms-ingest
COPY pyproject.toml README.md ./
COPY cms_ingest ./cms_ingest
COPY migrations ./migrations
RUN /opt/cms-ingest/bin/pip install --no-cache-dir .

FROM python:3.11-slim
COPY --from=build /opt/cms-ingest /opt/cms-ingest
ENV PATH=/opt/cms-ingest/bin:$PATH \
    PYTHONUNBUFFERED=1
# Config and secrets are mounted (e.g. /etc/cms-ingest/config.yaml, /run/secrets/*);
# media and an embedded database (when no database_url) live on the /var/lib/cms-ingest volume.
RUN mkdir -p /var/lib/cms-ingest /etc/cms-ingest && chown 10001:10001 /var/lib/cms-ingest
USER 10001:10001
VOLUME ["/var/lib/cms-ingest"]
EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["cms-ingest"]
CMD ["run", "--config", "/etc/cms-ingest/config.yaml"]
