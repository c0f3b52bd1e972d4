# The sweeps behind this folder (one H100, device tool, .devpack carried), from the repository root.
# new/ and old/: at commit 2fe03ba, blocking data-plane sockets ("new": streams4, streams1), then the
# same deployment with transfer/grpc_data.py as of 599620f (non-blocking sockets: "old").
# final/: the first sweep below alone, at commit 6e91e10 (both copies overlapped), --output-dir $OUT/final.
bash .devpack/install.sh >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD:$PWD/proto PYTHONUNBUFFERED=1
sed 's/num_gpu_blocks: 16384/num_gpu_blocks: 4096/' deploy/gpu-1p1d-grpc-1.yaml > /tmp/s4.yaml  # fits 80 GB
sed 's/data_streams: 4/data_streams: 1/' /tmp/s4.yaml > /tmp/s1.yaml
W="--dataset random --random-input-len 2048 --random-output-len 256 --num-prompts 48 --request-rates 2,4 --disable-tqdm"
python -m pdserve.bench.sweep --config streams4=/tmp/s4.yaml --config streams1=/tmp/s1.yaml $W --output-dir $OUT/new
git show 599620f:transfer/grpc_data.py > transfer/grpc_data.py
python -m pdserve.bench.sweep --config streams4_nonblocking=/tmp/s4.yaml $W --output-dir $OUT/old
