"""End-to-end fine-tuning (Sec. 2.4): the marginal NLL minimised over the generator and the
question encoder, the passage index fixed; resumable, on one process or data-parallel."""
