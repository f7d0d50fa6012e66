"""The messages fedsim's server and ClientApp exchange: every record name and key, defined once.

Both sides import these names; no other module spells a key out. Flower's own keys are here too,
so the whole wire is in one place: FedAvg's record names and weight key (`arrays`, `config`,
`num-examples`: fedsim's strategies pass `ARRAYS_RECORD`, `CONFIG_RECORD` and `NUM_EXAMPLES` to
Flower's constructors, `strategies.lora_strategy.RECORD_KEYS`), the round FedAvg writes into
every config (`server-round`) and FedProx's `proximal-mu`.

Query: server → every node, once per run, in a deployment (`fedsim.server.federation.discover_clients`)
    CONFIG_RECORD    ConfigRecord  SCENARIO (str): the resolved scenario, as JSON
  reply
    IDENTITY_RECORD  ConfigRecord  CLIENT_ID (int): the client (data partition) this node is,
                                   its node config's PARTITION_ID

Train: server → each sampled node (`LoraStrategy.configure_train`, `fedsim.server.rounds`)
    ARRAYS_RECORD    ArrayRecord   the global adapter at the node's rank, cut to the slice its
                                   pruned model kept, plus any `<layer>.base_delta` tensors; or,
                                   with the compressed downlink (`fedsim.compression.downlink`), instead:
    DOWN_RECORD      ConfigRecord  DOWN_KIND (str): DOWN_FULL (the whole broadcast adapter) or
                                   DOWN_DELTA (its change since DOWN_BASE); PAYLOAD (bytes): it,
                                   encoded by `fedsim.compression`; DOWN_BASE (int): the broadcast
                                   version a delta applies to (-1: full); DOWN_VERSION (int): the
                                   version the node holds once it applied the record
    CONFIG_RECORD    ConfigRecord  SCENARIO (str), as in a query; SERVER_ROUND (int, set by
                                   Flower's FedAvg); how to train (`LoraStrategy.instructions`):
                                   LORA_RANK (int): the LoRA rank to train at;
                                   LORA_UPLOADS (str): the factors whose update the reply carries
                                   ("AB", "A" or "B");
                                   LORA_FREEZE (str): the factors not to train ("" or "A": FFA-LoRA);
                                   LORA_PERSONAL_B (bool): keep B on the node across rounds (FedSA-LoRA);
                                   PENALTY_GAMMA (float): γ, the tail is ranks ⌊γ r⌋..r; PENALTY_LAMBDA
                                   (float): λ, the tail penalty's weight; SELF_PRUNE (bool): run the
                                   rank self-pruning test after training (HetLoRA, `strategies.hetlora`);
                                   PROXIMAL_MU (float): μ of the proximal term (set by Flower's FedProx);
                                   CLIENT_ID (int): in fedsim's own simulation, the client this node
                                   plays (`fedsim.server.federation.assign_clients`; no query there);
                                   the pruned model (`fedsim.fleet.keeps`): PRUNE_KEEP (str): the keep it
                                   holds, as JSON ("": unpruned); PRUNE_TARGET (float): the ratio it
                                   grows toward; PRUNE_STEPS (int): local steps trained in the run;
                                   with privacy on (`fedsim.privacy`): DP_CLIP (float): C_t, the L2
                                   bound of the update; DP_SCALE (float): s_g, the global scaling B is
                                   folded to before clipping; DP_LOCAL_NOISE (float): the std of the
                                   noise the client adds (local mode; 0: the server adds it);
                                   DP_REPORT (bool): reply the indicator bit (adaptive clipping);
                                   packing on, in fedsim's own simulation (`fedsim.server.packs`,
                                   `clients.packing`): PACK_ID (str): the pack this client trains in
                                   ("r3-p0"); PACK_SIZE (int): its clients; PACK_MEMORY (int): the
                                   bytes a packed step may use (0: 90 % of the free memory);
                                   PACK_TIMEOUT_S (float): how long the pack waits for its clients;
                                   FedSpeed (`strategies.fedspeed`): FEDSPEED_RHO, FEDSPEED_ALPHA,
                                   FEDSPEED_LAMBDA (float): ρ, α, λ of its local rule;
                                   asynchronous participation (`fedsim.server.asynchronous`):
                                   LOCAL_STEPS (int): the local steps the device chose (default:
                                   the scenario's train.local_steps)
  reply
    METRICS_RECORD   MetricRecord  TRAIN_METRICS, each a finite number: NUM_EXAMPLES (training
                                   examples, FedAvg's weight), TRAIN_LOSS (mean loss over the
                                   round's steps), LOSS_BEFORE and LOSS_AFTER (loss on a fixed probe
                                   batch before and after training), TOKENS and FLOPS (of the
                                   round's training), PRUNE_RATIO (share of the unpruned model's
                                   prunable parameters removed, 0 unpruned), WALL_TIME_S (seconds
                                   of training); and CLIENT_ID (int), which is not averaged
    UPDATE_RECORD    ConfigRecord  PAYLOAD (bytes): local − received over the LORA_UPLOADS factors,
                                   encoded by `fedsim.compression`
    PRUNE_RECORD     ConfigRecord  pruned clients only: FINAL_KEEP (str), the keep (JSON) the
                                   client ended its round with; the update covers its slice
    RANK_RECORD      ConfigRecord  clients told SELF_PRUNE only: KEPT_RANK (int), the rank the
                                   client kept; the update covers that rank
    DP_RECORD        ConfigRecord  clients told DP_REPORT only: BELOW_CLIP (int), 1 when the update's
                                   norm before clipping was <= DP_CLIP, else 0 (nothing else of it)

Evaluate: server → each sampled node (`LoraStrategy.configure_evaluate`)
    ARRAYS_RECORD, CONFIG_RECORD   as for train (never through the downlink; CLIENT_ID as for train)
  reply
    METRICS_RECORD   MetricRecord  NUM_EXAMPLES (int): test examples scored; CLIENT_ID (int);
                                   LOSS (float): response loss; ACCURACY (float): exact match;
                                   WALL_TIME_S (float)

Node config, set where the SuperNode starts (Flower's simulation, `fedsim supernode`):
PARTITION_ID (int), the client this node is, unless a message's CLIENT_ID says otherwise.
"""

# --- query ---------------------------------------------------------------------------------
CONFIG_RECORD = "config"  # Flower FedAvg's `configrecord_key`
SCENARIO = "scenario"
IDENTITY_RECORD = "identity"
CLIENT_ID = "client-id"

# --- train and evaluate: server → client ----------------------------------------------------
ARRAYS_RECORD = "arrays"  # Flower FedAvg's `arrayrecord_key`
DOWN_RECORD = "down"
DOWN_KIND = "kind"
DOWN_FULL = "full"  # a DOWN_KIND
DOWN_DELTA = "delta"  # a DOWN_KIND
DOWN_BASE = "base"
DOWN_VERSION = "version"
PAYLOAD = "payload"  # of DOWN_RECORD and UPDATE_RECORD
SERVER_ROUND = "server-round"  # Flower's: FedAvg.configure_train / configure_evaluate set it
LORA_RANK = "lora-rank"
LORA_UPLOADS = "lora-uploads"
LORA_FREEZE = "lora-freeze"
LORA_PERSONAL_B = "lora-personal-b"
PENALTY_GAMMA = "rank-penalty-gamma"
PENALTY_LAMBDA = "rank-penalty-lambda"
SELF_PRUNE = "rank-self-prune"
PROXIMAL_MU = "proximal-mu"  # Flower's: FedProx.configure_train sets it
PRUNE_KEEP = "prune-keep"
PRUNE_TARGET = "prune-target"
PRUNE_STEPS = "prune-steps"
DP_CLIP = "dp-clip"
DP_SCALE = "dp-global-scale"
DP_LOCAL_NOISE = "dp-local-noise"
DP_REPORT = "dp-report-bit"
PACK_ID = "pack-id"
PACK_SIZE = "pack-size"
PACK_MEMORY = "pack-memory-bytes"
PACK_TIMEOUT_S = "pack-timeout-s"
FEDSPEED_RHO = "fedspeed-rho"
FEDSPEED_ALPHA = "fedspeed-alpha"
FEDSPEED_LAMBDA = "fedspeed-lambda"
LOCAL_STEPS = "local-steps"

# --- train: client → server ------------------------------------------------------------------
METRICS_RECORD = "metrics"
NUM_EXAMPLES = "num-examples"  # Flower FedAvg's `weighted_by_key`
TRAIN_LOSS = "train-loss"
LOSS_BEFORE = "loss-before"
LOSS_AFTER = "loss-after"
TOKENS = "tokens"
FLOPS = "flops"
PRUNE_RATIO = "prune-ratio"
WALL_TIME_S = "wall-time-s"
UPDATE_RECORD = "update"
PRUNE_RECORD = "prune"
FINAL_KEEP = "keep"
RANK_RECORD = "rank"
KEPT_RANK = "kept"
DP_RECORD = "dp"
BELOW_CLIP = "below-clip"

# The metrics every train reply carries, each a finite number: the round loop reads them all and
# the strategy averages exactly these (Flower refuses replies whose metric keys differ).
TRAIN_METRICS = (NUM_EXAMPLES, TRAIN_LOSS, LOSS_BEFORE, LOSS_AFTER, TOKENS, FLOPS, WALL_TIME_S, PRUNE_RATIO)

# --- evaluate: client → server ---------------------------------------------------------------
LOSS = "loss"
ACCURACY = "accuracy"

# --- node config -----------------------------------------------------------------------------
PARTITION_ID = "partition-id"
