# The image every α-UMi service runs from; the command picks the role.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY evaluation ./evaluation
COPY umi ./umi
COPY umi_client ./umi_client
COPY examples ./examples
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps 'sglang==0.5.23'
ENV PYTHONUNBUFFERED=1
CMD ["umi", "--help"]
