"""One file per MoE variant; megamoe.moe.VARIANTS lists them."""
