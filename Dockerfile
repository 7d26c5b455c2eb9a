# astraora on a CUDA PyTorch base. Build: docker build -t astraora .
# Run:   docker run --gpus all -v "$PWD/outputs:/app/outputs" -v "$PWD/data:/app/data" astraora device=mzi task=cifar10 trainer=gpu
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline \
    ASTRAORA_DATA_DIR=/app/data

# gcc: the MZI engine's native CPU kernels are compiled on first use (astraora/devices/native.py)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY astraora ./astraora
COPY conf ./conf
COPY scripts ./scripts
COPY train.py ./
RUN pip install --no-cache-dir -e ".[sweeps]"

ENTRYPOINT ["python", "train.py"]
