"""The tiny world: a small, fully known world where Patch-Adapter's quality can be measured.

No SDXL weights can be had offline, so the project trains its own tiny backbone (the
same diffusers classes as SDXL-inpainting, at small widths) in a procedural world whose
truth is known at every resolution. Everything that world needs lives here:

- `scenes`: the one scene generator (shapes, colours, textured backgrounds) and its
  vocabulary; the benchmark's tasks and the training views both draw from it;
- `tokenizer`: CLIP's tokenizer class with one token per vocabulary word;
- `architecture`: the tiny backbone's configs and seeded random components;
- `views`: native-size training views with their inpainting lessons;
- `competence`: what the backbone can do at native size (texture kept by the VAE,
  inserts read back);
- `recipe`: `make train-tiny`, in stages that each write their result into `stages/`;
- `weights/`: the shipped backbone with its adapters (``"tiny"`` in every loader).

The core (`backbone`, `pipeline`, `adapters`, `tiling`, ...) never imports this
package: it reads `weights/` as any diffusers folder, by path.
"""
