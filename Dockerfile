# phi-gateway: `phi-gateway serve`, configured by PHI_GATEWAY_* environment variables.
# Linted with hadolint in ./scripts/test; no container engine runs where this was written,
# so the image itself is not built by CI (see README).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY phi_gateway ./phi_gateway
RUN python -m venv /opt/phi-gateway \
    && /opt/phi-gateway/bin/pip install --no-cache-dir --upgrade pip==25.3 \
    && /opt/phi-gateway/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 phi \
    && useradd --system --uid 10001 --gid phi --home-dir /nonexistent --shell /usr/sbin/nologin phi
COPY --from=build /opt/phi-gateway /opt/phi-gateway
COPY policies /etc/phi-gateway/policies
ENV PATH=/opt/phi-gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PHI_GATEWAY_HOST=0.0.0.0 \
    PHI_GATEWAY_PORT=8080 \
    PHI_GATEWAY_ADMIN_HOST=0.0.0.0 \
    PHI_GATEWAY_ADMIN_PORT=9090 \
    PHI_GATEWAY_POLICIES=/etc/phi-gateway/policies
USER 10001:10001
# 8080: the gateway; 9090: /healthz, /readyz, /metrics (keep it off the public network).
EXPOSE 8080 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
ENTRYPOINT ["phi-gateway", "serve"]
