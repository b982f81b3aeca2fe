# GPU image: CUDA PyTorch base, the project installed, `lightning` as entry point.
#   docker build -t msflows .
#   docker run --gpus all -v $PWD/data:/app/data -v $PWD/runs:/app/runs msflows \
#       fit --config experiments/glow_cifar10.yaml
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /app
COPY pyproject.toml README.md ./
COPY flows ./flows
COPY datamodules ./datamodules
COPY lightning_modules ./lightning_modules
COPY experiments ./experiments
RUN pip install --no-cache-dir .
ENTRYPOINT ["lightning"]
CMD ["fit", "--config", "experiments/quickstart.yaml"]
