# Minimal CPU image of the explorer. The GPU Space image (CUDA base, non-root user, baked
# caches) is tracked separately; this one runs `python launch.py` on the demo gallery.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_SERVER_NAME=0.0.0.0

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY engine ./engine
COPY app ./app
COPY assets ./assets
COPY launch.py .

EXPOSE 7860
CMD ["python", "launch.py", "--host", "0.0.0.0", "--port", "7860"]
