#!/usr/bin/env bash
# Wheels for the GPU box of bench/gpu_session.sh: its image has Python 3.12 with torch (CUDA), numpy, pillow,
# accelerate, safetensors, httpx, pytest... but no package index and none of the packages below (or older
# ones). Run here, where pip reaches the index; .whl/ is ignored by git and travels with the tree (32 MB).
set -eu
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.42.1 transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 peft==0.21.2 compel==2.5.1 \
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 \
    annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4 uvicorn==0.54.0 httptools==0.9.0 \
    watchfiles==1.3.0 websockets==17.4 sse-starlette==3.7.0 python-multipart==0.0.34 limits==5.8.0 \
    Deprecated==1.3.1 prometheus-fastapi-instrumentator==8.1.0 python-json-logger==4.2.0 standardwebhooks==1.1.0 \
    httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 lazy-importer==0.1.0 opentelemetry-api==1.45.2 \
    importlib_metadata==10.2.0 celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 \
    click-didyoumean==0.3.1 click-plugins==1.1.1.2 click-repl==0.4.1 prompt_toolkit==3.0.53 wcwidth==0.9.4 \
    tzlocal==5.4.5 redis==8.1.0
ls .whl | wc -l
