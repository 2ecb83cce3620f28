# A monorepo's six services on one base: `kiln bake` builds them as one submission (the
# base's step and the services' identical step once); Docker 20.10 has no bake, so the
# reference builds the base, then the services one after another or all at once.
variable "BASE" {
}
group "default" {
  targets = ["services"]
}
target "base" {
  context = "base"
  args = { BASE = BASE }
}
target "services" {
  name = "svc${n}"
  matrix = { n = ["1", "2", "3", "4", "5", "6"] }
  context = "svc${n}"
  contexts = { base = "target:base" }
}
