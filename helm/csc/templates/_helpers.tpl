{{/* Names, labels and secret references shared by the templates. */}}

{{- define "csc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "csc.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "csc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "csc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "csc.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "csc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "csc.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The Secret the chart creates for values given inline. */}}
{{- define "csc.secretName" -}}
{{- printf "%s-secrets" (include "csc.fullname" .) -}}
{{- end -}}

{{/* Name of the Secret holding one item of .Values.secrets: (list $ "signingKey"). */}}
{{- define "csc.secretRef" -}}
{{- $root := index . 0 -}}
{{- $item := index $root.Values.secrets (index . 1) -}}
{{- if $item.existingSecret -}}
{{- $item.existingSecret -}}
{{- else if $item.value -}}
{{- include "csc.secretName" $root -}}
{{- else -}}
{{- fail (printf "secrets.%s: set existingSecret (a Secret's name) or value" (index . 1)) -}}
{{- end -}}
{{- end -}}

{{- define "csc.grace" -}}
{{- $min := add .Values.preStopSeconds .Values.drainTimeoutSeconds -}}
{{- if .Values.terminationGracePeriodSeconds -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $min) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed preStopSeconds + drainTimeoutSeconds (%v)" .Values.terminationGracePeriodSeconds $min) -}}
{{- end -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add $min 15 -}}
{{- end -}}
{{- end -}}
