{{/* The release's base name. */}}
{{- define "kiln.fullname" -}}
{{- if contains "kiln" .Release.Name -}}
{{- .Release.Name | trunc 24 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-kiln" .Release.Name | trunc 24 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kiln.labels" -}}
app.kubernetes.io/name: kiln
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kiln.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* A pool's image (given as (list $ pool)): its own, else the chart's (one multi-arch image,
     or one per architecture). */}}
{{- define "kiln.poolImage" -}}
{{- $root := index . 0 -}}{{- $pool := index . 1 -}}
{{- $image := $pool.image | default dict -}}
{{ $image.repository | default $root.Values.image.repository }}:{{ $image.tag | default $root.Values.image.tag | default $root.Chart.AppVersion }}
{{- end -}}

{{/* A coordinator member's config (given as (list $ INDEX)). */}}
{{- define "kiln.coordinatorConfig" -}}
{{- $root := index . 0 -}}{{- $i := index . 1 -}}
{{- $replicas := int $root.Values.coordinator.replicas -}}
[tls]
ca = "/etc/kiln/tls/ca.crt"
cert = "/etc/kiln/tls/tls.crt"
key = "/etc/kiln/tls/tls.key"

[coordinator]
listen = "0.0.0.0:{{ $root.Values.coordinator.port }}"
root = "/var/lib/kiln/state"
metrics-listen = "0.0.0.0:{{ $root.Values.coordinator.metricsPort }}"
{{- if $root.Values.coordinator.web.enabled }}
web-listen = "0.0.0.0:{{ $root.Values.coordinator.web.port }}"
{{- end }}
lease-timeout = {{ $root.Values.coordinator.leaseTimeout | quote }}
placement-timeout = {{ $root.Values.coordinator.placementTimeout | quote }}
{{- if gt $replicas 1 }}
node-id = {{ add1 $i }}
peers = {{ include "kiln.peers" $root }}
{{- end }}
{{- with $root.Values.coordinator.sharedCache }}

[coordinator.cache]
shared = {{ . | quote }}
{{- end }}
{{- range $root.Values.tokens }}

[[coordinator.tokens]]
name = {{ .name | quote }}
tenant = {{ .tenant | default "default" | quote }}
role = {{ .role | default "build" | quote }}
sha256 = {{ .sha256 | quote }}
{{- end }}
{{- end -}}

{{/* A pool's worker config (given as (list $ pool)). */}}
{{- define "kiln.workerConfig" -}}
{{- $root := index . 0 -}}{{- $pool := index . 1 -}}
[tls]
ca = "/etc/kiln/tls/ca.crt"
cert = "/etc/kiln/tls/tls.crt"
key = "/etc/kiln/tls/tls.key"

[worker]
coordinator = {{ include "kiln.coordinatorUrl" $root | quote }}
listen = "0.0.0.0:7071"
root = "/var/lib/kiln/state"
platforms = [{{ $pool.platform | quote }}]
max-parallelism = {{ $pool.maxParallelism }}
metrics-listen = "0.0.0.0:9091"
labels = { pool = {{ $pool.name | quote }}{{ range $key, $value := $pool.labels }}, {{ $key | quote }} = {{ $value | quote }}{{ end }} }

[worker.gc]
{{- /* An emptyDir's limit is not the disk's (which kilnd's defaults are made of): collect at
       80% of it, keeping at most 10% of it, before the kubelet evicts the pod. */}}
{{- $size := $pool.cache.size }}
{{- $mib := ternary (mul (int64 (trimSuffix "Ti" $size)) 1048576) (mul (int64 (trimSuffix "Gi" $size)) 1024) (hasSuffix "Ti" $size) }}
{{- $emptyDir := eq $pool.cache.type "emptyDir" }}
{{- if $pool.gc.reservedSpace }}
reserved-space = {{ $pool.gc.reservedSpace | quote }}
{{- else if $emptyDir }}
reserved-space = "{{ div $mib 10 }}MiB"
{{- end }}
{{- if $pool.gc.maxUsedSpace }}
max-used-space = {{ $pool.gc.maxUsedSpace | quote }}
{{- else if $emptyDir }}
max-used-space = "{{ div (mul $mib 8) 10 }}MiB"
{{- end }}
{{- with $pool.gc.minFreeSpace }}
min-free-space = {{ . | quote }}
{{- end }}
{{- with $pool.gc.keepDuration }}
keep-duration = {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The coordinators' StatefulSet and headless Service. */}}
{{- define "kiln.coordinator" -}}
{{ include "kiln.fullname" . }}-coordinator
{{- end -}}

{{/* The DNS suffix of the release's namespace. */}}
{{- define "kiln.domain" -}}
{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end -}}

{{/* Every coordinator member as ID=URL, for peers. */}}
{{- define "kiln.peers" -}}
{{- $coordinator := include "kiln.coordinator" . -}}
{{- $domain := include "kiln.domain" . -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.coordinator.replicas) -}}
{{- $peers = append $peers (printf "%d=https://%s-%d.%s.%s:%d" (add1 $i) $coordinator $i $coordinator $domain (int $.Values.coordinator.port)) -}}
{{- end -}}
{{- $peers | toJson -}}
{{- end -}}

{{/* What workers dial: the headless Service, which resolves to every member. */}}
{{- define "kiln.coordinatorUrl" -}}
https://{{ include "kiln.coordinator" . }}.{{ include "kiln.domain" . }}:{{ .Values.coordinator.port }}
{{- end -}}

{{/* The TLS Secret of the coordinators, and of a pool (given as (list $ pool)). */}}
{{- define "kiln.coordinatorTlsSecret" -}}
{{- if eq .Values.tls.mode "secrets" -}}{{ required "tls.coordinatorSecret is required with tls.mode=secrets" .Values.tls.coordinatorSecret }}{{- else -}}{{ include "kiln.coordinator" . }}-tls{{- end -}}
{{- end -}}

{{- define "kiln.poolTlsSecret" -}}
{{- $root := index . 0 -}}{{- $pool := index . 1 -}}
{{- if eq $root.Values.tls.mode "secrets" -}}{{ required (printf "tls.poolSecrets.%s is required with tls.mode=secrets" $pool.name) (index $root.Values.tls.poolSecrets $pool.name) }}{{- else -}}{{ include "kiln.fullname" $root }}-worker-{{ $pool.name }}-tls{{- end -}}
{{- end -}}

{{/* The names a coordinator's certificate covers. */}}
{{- define "kiln.coordinatorNames" -}}
{{- $coordinator := include "kiln.coordinator" . -}}
{{- $domain := include "kiln.domain" . -}}
{{- $client := include "kiln.fullname" . -}}
{{- list (printf "%s.%s" $coordinator $domain) (printf "*.%s.%s" $coordinator $domain) (printf "%s.%s" $client $domain) (printf "%s.%s.svc" $client .Release.Namespace) (printf "%s.%s" $client .Release.Namespace) $client | toJson -}}
{{- end -}}

{{/* The names a pool's certificate covers: each worker is named after its pod. */}}
{{- define "kiln.poolNames" -}}
{{- $root := index . 0 -}}{{- $pool := index . 1 -}}
{{- list (printf "*.%s-worker-%s.%s" (include "kiln.fullname" $root) $pool.name (include "kiln.domain" $root)) | toJson -}}
{{- end -}}

{{/* kubernetes.io/arch of a platform (linux/arm64/v8 → arm64). */}}
{{- define "kiln.arch" -}}
{{- index (splitList "/" .) 1 -}}
{{- end -}}

{{/* The kilnd security context of a worker: containers in containers need what buildkitd
     needs rootful. Privileged gives it: mounting overlay snapshots and /proc, namespaces
     (pid, mount, network, uts, ipc), writing the cgroup tree for each step, veth pairs and
     masquerading for the isolated step network. Nothing less lets libcontainer work inside
     a pod (a read-only /sys/fs/cgroup otherwise). */}}
{{- define "kiln.workerSecurityContext" -}}
privileged: true
runAsUser: 0
runAsNonRoot: false
{{- end -}}

{{/* A coordinator runs no container: no privilege at all. */}}
{{- define "kiln.coordinatorSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* What a pool leaves out (a pool list in values replaces the default one whole). */}}
{{- define "kiln.poolDefaults" -}}
replicas: 1
minReplicas: 1
maxReplicas: 4
gc: {}
cache:
  type: emptyDir
  size: 50Gi
  storageClassName: ""
resources: {}
labels: {}
tolerations: []
terminationGracePeriodSeconds: 3600
{{- end -}}

{{/* The pools, each over the defaults. */}}
{{- define "kiln.pools" -}}
{{- $pools := list -}}
{{- $defaults := include "kiln.poolDefaults" . | fromYaml -}}
{{- range .Values.workerPools -}}
{{- /* Key by key: merge would take a default over a given 0 (minReplicas: 0). */ -}}
{{- $pool := deepCopy . -}}
{{- range $key, $value := $defaults -}}
{{- if not (hasKey $pool $key) -}}
{{- $_ := set $pool $key $value -}}
{{- else if kindIs "map" $value -}}
{{- range $inner, $default := $value -}}
{{- if not (hasKey (index $pool $key) $inner) -}}
{{- $_ := set (index $pool $key) $inner $default -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $pools = append $pools $pool -}}
{{- end -}}
{{- toJson $pools -}}
{{- end -}}
