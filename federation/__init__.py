"""radfed.federation: learning from many hospitals.

Its rooms, top to bottom: ``lab`` (a whole federation on this machine, experiments), ``coordinator`` (the Flower
ServerApp and its checkpoint) beside ``site`` (the ClientApp, the warm site worker, a round's work), ``job`` (the
contract between the two: run config, records, plan, alerts) and ``learning`` (training, DP, evaluation, aggregation,
export; no Flower).
"""
