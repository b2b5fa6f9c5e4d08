{{/*
Names are fixed, not derived from the release: the operator creates the proxy fleet's
ServiceAccount sallyport-proxy itself, and `sallyport-operator rbac` names the RBAC
objects the same way. One release per cluster.
*/}}
{{- define "sallyport.operatorName" -}}sallyport-operator{{- end }}
{{- define "sallyport.proxyName" -}}sallyport-proxy{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "sallyport.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sallyport
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* Selector labels of the operator's Pods. */}}
{{- define "sallyport.operatorSelector" -}}
app.kubernetes.io/name: sallyport-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* An image reference from {repository, tag, digest}; the tag defaults to appVersion. */}}
{{- define "sallyport.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end }}

{{/* NAMESPACE/NAME of a Secret reference whose namespace defaults to the release's. */}}
{{- define "sallyport.namespaced" -}}
{{- $ref := index . 0 -}}
{{- $root := index . 1 -}}
{{- printf "%s/%s" (default $root.Release.Namespace $ref.namespace) $ref.name -}}
{{- end }}
