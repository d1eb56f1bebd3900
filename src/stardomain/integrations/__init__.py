"""Starlight inside other training frameworks: `lightning` (a callback for any LightningModule) and `hf` (a
`transformers.Trainer` whose loss is the Starlight objective). Each imports its framework only when used;
both drive `stardomain.objective.Starlight` through its context form (`Starlight.drawn`)."""
