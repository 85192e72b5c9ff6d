# CPU image of the explorer on the demo gallery. The GPU Space image (CUDA base, non-root user)
# is tracked separately. The demo gallery's cache is built at image build time, so a container
# serves within seconds.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    RETRIEVAL_EXPLORER_CACHE=/app/cache

WORKDIR /app
COPY requirements.txt .
# The CPU builds of torch/torchvision first (PyPI's default wheels bundle CUDA, several GB).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir -r requirements.txt
COPY engine ./engine
COPY app ./app
COPY assets ./assets
COPY launch.py .
RUN python launch.py --prepare-only --device cpu

EXPOSE 7860
CMD ["python", "launch.py", "--host", "0.0.0.0", "--port", "7860"]
